"""The fault runs of the long tier (issue 28): `spinemm predict` and `spinemm cache` as a user runs
them, on a disk that fills up (RLIMIT_FSIZE) and killed at random moments (SIGKILL). Nothing a
previous run wrote is lost or cut, and every failure is a spinemm error naming the path.

Marked ``fuzz``: ``make test-fuzz`` runs them (each starts a few dozen processes).
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import spinemm

pytestmark = pytest.mark.fuzz

OUTPUTS = ("submission.csv", "locations.csv")


def _spinemm(*args: str, fsize: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    def limit() -> None:
        if fsize is not None:  # a write past the limit fails with EFBIG, as on a full disk
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "spinemm", *args], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, env=env)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        spinemm.create_model("spine-tiny").save_pretrained(folder / f"m{seed}")
        paths.append(folder / f"m{seed}")
    return paths


def _pair(out: Path) -> tuple[bytes, bytes] | None:
    return None if not (out / OUTPUTS[0]).exists() else tuple((out / name).read_bytes() for name in OUTPUTS)


def test_predict_on_a_full_disk_keeps_the_last_pair_and_names_the_path(two_models, phantom_root, tmp_path):
    out = tmp_path / "out"
    first = _spinemm("predict", "--model", str(two_models[0]), "--data", str(phantom_root), "--out", str(out))
    assert first.returncode == 0, first.stderr
    before = _pair(out)
    assert min(len(b) for b in before) > 2_000
    full = _spinemm("predict", "--model", str(two_models[1]), "--data", str(phantom_root), "--out", str(out),
                    fsize=1_000)  # neither file of the new pair fits
    assert full.returncode == 2, full.stderr
    assert str(out) in full.stderr and "error" in full.stderr.lower() and "Traceback" not in full.stderr
    assert _pair(out) == before  # byte for byte
    assert sorted(p.name for p in out.iterdir()) == ["locations.csv", "submission.csv", "warnings.txt"]


def test_cache_on_a_full_disk_names_the_path_and_a_second_run_completes_it(phantom_root, tmp_path):
    cache = tmp_path / "cache"
    full = _spinemm("cache", str(phantom_root), "--cache-dir", str(cache), "--split", "test", "--quiet",
                    fsize=20_000)
    assert full.returncode == 2, full.stderr
    assert str(cache) in full.stderr and "Traceback" not in full.stderr
    again = _spinemm("cache", str(phantom_root), "--cache-dir", str(cache), "--split", "test", "--quiet")
    assert again.returncode == 0, again.stderr


def test_predict_killed_at_random_moments_never_leaves_a_cut_file(two_models, phantom_root, tmp_path):
    """Runs of two models alternate into one folder, each killed after a random delay. After every
    kill the folder holds a whole pair of one run (or nothing yet); a pair mixing the two runs can
    only come from the instant between the two renames (README: Reliability) and is counted."""
    out = tmp_path / "out"
    reference = {}
    for model in two_models:
        done = _spinemm("predict", "--model", str(model), "--data", str(phantom_root), "--out", str(tmp_path / model.name))
        assert done.returncode == 0, done.stderr
        reference[model.name] = _pair(tmp_path / model.name)
    tic = time.perf_counter()
    _spinemm("predict", "--model", str(two_models[0]), "--data", str(phantom_root), "--out", str(out))
    seconds = time.perf_counter() - tic
    rng, mixed, kills = random.Random(0), 0, 12
    for k in range(kills):
        model = two_models[k % 2]
        proc = subprocess.Popen([sys.executable, "-m", "spinemm", "predict", "--model", str(model), "--data",
                                 str(phantom_root), "--out", str(out)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        time.sleep(rng.uniform(0.5, 1.1) * seconds)  # mostly late in the run, where it writes
        proc.kill()
        proc.wait()
        pair = _pair(out)
        if pair in reference.values():
            continue
        subs, locs = ({m: reference[m][i] for m in reference} for i in (0, 1))
        assert pair[0] in subs.values() and pair[1] in locs.values(), "a cut or foreign file"
        mixed += 1
    for name in OUTPUTS:  # whatever is there parses whole
        assert len(pd.read_csv(out / name)) == len(pd.read_csv(tmp_path / two_models[0].name / name))
    print(f"\n{kills} kills of a {seconds:.1f} s predict: every pair whole; {mixed} mixed pairs")
    assert mixed <= 1
    final = _spinemm("predict", "--model", str(two_models[0]), "--data", str(phantom_root), "--out", str(out))
    assert final.returncode == 0, final.stderr  # a dead run's lock and temps are taken over
    assert _pair(out) == reference[two_models[0].name]
    assert not list(out.glob(".*.tmp"))
