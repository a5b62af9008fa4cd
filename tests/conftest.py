"""Shared fixtures. Tests are offline and single-threaded so the suite is steady on 2 cores."""

from __future__ import annotations

import os

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
        reads[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return reads


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
