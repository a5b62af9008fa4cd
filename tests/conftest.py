"""Shared fixtures. Tests are offline and single-threaded so the suite is steady on 2 cores."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections import Counter  # noqa: E402

import pydicom  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """A small phantom dataset (8 train + 3 test studies, 64 px), made once per test session."""
    from spinemm.data import make_phantom

    root = tmp_path_factory.mktemp("phantom")
    make_phantom(root, n_studies=8, n_test=3, seed=0, image_size=64, progress=False)
    return root


@pytest.fixture
def count_reads(monkeypatch):
    """Counter of pydicom.dcmread calls per file name (every module reads DICOM through it)."""
    reads: Counter = Counter()
    real = pydicom.dcmread

    def counting(path, *args, **kwargs):
        reads[str(getattr(path, "name", path))] += 1  # a path, or a file opened from one
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return reads


@pytest.fixture
def launch_two_cpu():
    """Runs ``python SCRIPT ARGS...`` as two CPU ranks of ``accelerate launch`` (the repo's
    ``recipes/accelerate/cpu_2proc.yaml``, on a port free now); returns the finished process."""
    repo = Path(__file__).resolve().parents[1]

    def launch(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(repo / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(port), *args]
        return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)

    return launch


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-long",
        action="store_true",
        default=False,
        help="run the fuzz tests (tests/test_fuzz.py) with 10,000 cases each instead of a short CI run; "
        "SPINEMM_FUZZ_LONG=1 does the same",
    )


@pytest.fixture(scope="session")
def fuzz_examples(request) -> int:
    """Cases per fuzz target: a short deterministic run by default, 10,000 with --fuzz-long
    (SPINEMM_FUZZ_EXAMPLES=N sets any other count)."""
    if os.environ.get("SPINEMM_FUZZ_EXAMPLES"):
        return int(os.environ["SPINEMM_FUZZ_EXAMPLES"])
    long = request.config.getoption("--fuzz-long") or os.environ.get("SPINEMM_FUZZ_LONG") == "1"
    return 10_000 if long else 60


# Longest tests first: pytest-xdist (`make test`) hands each worker a share of the collected order
# and idle workers steal from the others, so a minute-long test started last keeps one core busy
# after the other has finished. Starting the end-to-end runs first lets the short ones fill in
# around them (the regression run, about a minute on one core, leads).
LONGEST_FIRST = ("test_regression.py",)


def pytest_sessionstart(session):
    """The long fuzz tier (``make test-fuzz``): bound the address space once everything is imported
    (tests/fuzz_bound.py)."""
    if os.environ.get("SPINEMM_FUZZ_MEMORY_GIB"):
        import fuzz_bound

        fuzz_bound.prewarm()
        fuzz_bound.apply()


def pytest_collection_modifyitems(config, items):
    # the long fuzz tier runs only when asked for: SPINEMM_FUZZ=1 (make test-fuzz) or -m naming fuzz
    if os.environ.get("SPINEMM_FUZZ") != "1" and "fuzz" not in (config.option.markexpr or ""):
        fuzz = [item for item in items if item.get_closest_marker("fuzz")]
        if fuzz:
            config.hook.pytest_deselected(items=fuzz)
            items[:] = [item for item in items if not item.get_closest_marker("fuzz")]

    def rank(item) -> int:
        if item.path.name in LONGEST_FIRST:
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)  # stable: the order within each rank is unchanged
