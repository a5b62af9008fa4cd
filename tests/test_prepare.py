"""`spinemm cache`: a whole folder decoded into the series cache with all cores, resumable, nothing lost."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

import spinemm.data.prepare as prepare
from spinemm.cli import main
from spinemm.data.store import SeriesStore
from spinemm.data.tables import load_series_descriptions


def _series(root) -> list[tuple[int, int]]:
    frame = load_series_descriptions(root, "train")
    return [tuple(map(int, pair)) for pair in frame[["study_id", "series_id"]].drop_duplicates().to_numpy()]


def test_cache_fills_every_series_with_workers_then_runs_read_no_dicom(phantom_root, tmp_path, count_reads):
    report = prepare.fill_cache(phantom_root, tmp_path / "cache", workers=2, progress=False)
    pairs = _series(phantom_root)
    assert report.series == report.written == len(pairs) and not report.failed and report.files > 0
    store = SeriesStore(phantom_root, "train", cache_dir=tmp_path / "cache")
    assert all(store.cached(*pair) for pair in pairs)
    for pair in pairs:
        store.get(*pair)
    assert store.decodes == 0 and store.disk_hits == len(pairs) and not count_reads  # no DICOM opened here
    again = prepare.fill_cache(phantom_root, tmp_path / "cache", workers=0, progress=False)
    assert again.skipped == len(pairs) and again.written == 0 and not count_reads


def test_an_interrupted_run_resumes_without_redoing_finished_series(phantom_root, tmp_path, monkeypatch, count_reads):
    real, done = prepare._cache_one, []

    def dies_after_five(job):
        if len(done) == 5:
            raise KeyboardInterrupt  # the run is killed between two series
        done.append(job)
        return real(job)

    monkeypatch.setattr(prepare, "_cache_one", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        prepare.fill_cache(phantom_root, tmp_path / "cache", workers=0, progress=False)
    monkeypatch.setattr(prepare, "_cache_one", real)
    count_reads.clear()
    report = prepare.fill_cache(phantom_root, tmp_path / "cache", workers=0, progress=False)
    assert report.skipped == 5 and report.written == report.series - 5
    finished = {Path(phantom_root, "train_images", str(st), str(se)) for _, _, _, st, se in done}
    assert not {Path(p).parent for p in count_reads} & finished  # finished series were not read again


def test_unreadable_series_is_named_and_the_rest_cached(phantom_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    study_id, series_id = _series(root)[0]
    bad = root / "train_images" / str(study_id) / str(series_id)
    for path in bad.glob("*.dcm"):
        path.write_bytes(b"not a dicom file")
    with pytest.warns(UserWarning, match=str(bad)):
        report = prepare.fill_cache(root, tmp_path / "cache", workers=0, progress=False)
    assert list(report.failed) == [str(bad)] and report.written == report.series - 1
    with pytest.warns(UserWarning):
        assert main(["cache", str(root), "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 2
    assert "could not be read" in capsys.readouterr().err


# Runs the CLI under each rank, printing every series that rank caches (proof that the work was split).
_RANK_SCRIPT = """
import os, sys
import spinemm.data.prepare as prepare
real = prepare._cache_one
def cache_one(job):
    print(f"rank {os.environ['RANK']} caches {job[3]}/{job[4]}", flush=True)
    return real(job)
prepare._cache_one = cache_one
from spinemm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_cache_under_accelerate_launch_splits_the_series_between_processes(phantom_root, tmp_path, launch_two_cpu):
    script = tmp_path / "rank_cache.py"
    script.write_text(_RANK_SCRIPT)
    proc = launch_two_cpu(str(script), "cache", str(phantom_root), "--cache-dir", str(tmp_path / "cache"),
                          "--workers", "0", "--quiet")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pairs = _series(phantom_root)
    # the two ranks print at once into one pipe: their lines can run together, so match, not split
    cached = re.findall(r"rank (\d) caches (\d+)/(\d+)", proc.stdout)
    by_rank = {rank: {(int(st), int(se)) for r, st, se in cached if r == rank} for rank in "01"}
    assert len(cached) == len(pairs) and by_rank["0"] | by_rank["1"] == set(pairs)  # each series once
    assert len(by_rank["0"]) == (len(pairs) + 1) // 2 and len(by_rank["1"]) == len(pairs) // 2
    # one line, from rank 0, with the gathered report of both
    assert re.findall(r"(\d+) series: (\d+) written", proc.stdout) == [(str(len(pairs)), str(len(pairs)))]
    store = SeriesStore(phantom_root, "train", cache_dir=tmp_path / "cache")
    assert all(store.cached(*pair) for pair in pairs)


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("how", ["not writable", "write refused"])
def test_a_read_only_cache_serves_predict_and_is_never_written(phantom_root, tmp_path, monkeypatch, count_reads, how):
    import os

    import pandas as pd
    import torch

    import spinemm
    import spinemm.files
    from spinemm.errors import SpineOutputError
    from spinemm.models.config import LocatorConfig
    from spinemm.pipeline import LocateStage, SpinePipeline

    torch.manual_seed(0)
    pipeline = SpinePipeline(spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32}),
                             LocateStage(LocatorConfig(size=32, channels=(8, 16, 16))))
    cache = tmp_path / "cache"
    prepare.fill_cache(phantom_root, cache, split="test", workers=0, progress=False)  # full-res series only
    before = _listing(cache)
    expected = spinemm.predict(pipeline, phantom_root, "test", progress=False)  # no cache at all
    if how == "not writable":  # a read-only mount (a Kaggle input dataset)
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == cache else real_access(p, mode))
    else:  # a folder whose writes fail for want of permission
        real_temp = spinemm.files._temp_beside

        def refused(path, data):
            if cache in Path(path).parents:
                raise SpineOutputError(f"cannot write {path}") from PermissionError(13, "Permission denied")
            return real_temp(path, data)

        monkeypatch.setattr(spinemm.files, "_temp_beside", refused)
    count_reads.clear()
    with pytest.warns(UserWarning, match="read-only") if how == "write refused" else contextlib.nullcontext():
        got = spinemm.predict(pipeline, phantom_root, "test", progress=False, cache_dir=cache)
    assert _listing(cache) == before  # nothing written, nothing touched
    assert not count_reads  # every series came from the cache's entries: no DICOM file opened
    pd.testing.assert_frame_equal(got.submission(), expected.submission())
