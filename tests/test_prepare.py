"""`spinemm cache`: a whole folder decoded into the series cache with all cores, resumable, nothing lost."""

from __future__ import annotations

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
