"""The series store and the staged pipeline: one read per file, typed records, folders, resumable stages."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import spinemm
from spinemm.data import load_tables
from spinemm.data.store import SeriesStore, windowed
from spinemm.errors import SpineDataError
from spinemm.models.config import GraderConfig, LocatorConfig
from spinemm.pipeline import Findings, GradeStage, LocateStage, SpinePipeline


def _untrained_pipeline(image_size=32):
    torch.manual_seed(0)
    detect = spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": image_size})
    grade = GradeStage(GraderConfig(backbone="cnn", size=16, channels=(8, 16)), query_dim=detect.config.fusion.dim)
    return SpinePipeline(detect, LocateStage(LocatorConfig(size=32, channels=(8, 16, 16))), grade)


@pytest.fixture(scope="module")
def real_size_root(tmp_path_factory):
    """Two test studies at the real 512 px size."""
    root = tmp_path_factory.mktemp("real-size") / "phantom"
    return spinemm.data.make_phantom(root, n_studies=2, n_test=2, seed=3, image_size=512, progress=False)


@pytest.mark.slow
def test_predict_opens_each_dicom_file_once_at_real_size(real_size_root, count_reads, tmp_path):
    files = sorted(str(p) for p in (real_size_root / "test_images").rglob("*.dcm"))
    result = spinemm.predict(_untrained_pipeline(), real_size_root, split="test", progress=False,
                             cache_dir=tmp_path / "cache")
    assert result.graded is not None and result.grade_probs is not None  # every stage ran
    assert len(count_reads) == len(files) and set(count_reads) == set(files)
    assert max(count_reads.values()) == 1, count_reads.most_common(3)
    # A second run over the same cache folder decodes nothing at all.
    count_reads.clear()
    again = spinemm.predict(_untrained_pipeline(), real_size_root, split="test", progress=False,
                            cache_dir=tmp_path / "cache")
    assert not count_reads
    pd.testing.assert_frame_equal(again.submission(), result.submission())
    pd.testing.assert_frame_equal(again.locations(), result.locations())


def test_predict_keeps_one_batch_of_studies_in_memory(phantom_root, monkeypatch):
    """The store a run makes for itself drops each batch's series once every stage has read them,
    so peak memory does not grow with the study count (benchmarks/predict_memory.py measures it)."""
    import spinemm.pipeline.pipeline as pipeline_module

    held: list[int] = []

    class Watched(SeriesStore):
        def _remember(self, key, series):
            super()._remember(key, series)
            held.append(len({study for study, _ in self._memory}))

    monkeypatch.setattr(pipeline_module, "SeriesStore", Watched)
    result = spinemm.predict(_untrained_pipeline(), phantom_root, split="test", batch_size=1, progress=False)
    assert len(result.study_ids) == 3 and held and max(held) == 1, held
    # a store the caller passes keeps its series (up to memory_bytes) for later reads
    store = SeriesStore(phantom_root, "test")
    spinemm.predict(_untrained_pipeline(), phantom_root, split="test", store=store, batch_size=1, progress=False)
    assert len({study for study, _ in store._memory}) == 3
    store.forget_study(result.study_ids[0])
    assert len({study for study, _ in store._memory}) == 2


def test_store_reads_once_bounds_memory_and_round_trips_through_disk(phantom_root, tmp_path, count_reads):
    frame = load_tables(phantom_root, "train")
    keys = frame[frame.series_id >= 0][["study_id", "series_id"]].drop_duplicates().to_numpy()[:4]
    store = SeriesStore(phantom_root, "train", cache_dir=tmp_path / "cache", memory_bytes=1)
    first = [store.get(*key) for key in keys]
    assert store.decodes == 4 and all(s.windowed and s.volume.dtype == np.float16 for s in first)
    assert 0.0 <= float(first[0].volume.min()) and float(first[0].volume.max()) == 1.0
    # memory_bytes=1 keeps only the latest series; the others come back from disk, not DICOM.
    reads = sum(count_reads.values())
    assert store.get(*keys[-1]) is first[-1] and store.memory_hits == 1
    back = store.get(*keys[0])
    assert sum(count_reads.values()) == reads and store.disk_hits == 1
    np.testing.assert_array_equal(back.volume, first[0].volume)
    np.testing.assert_array_equal(back.positions, first[0].positions)
    assert back.instance_to_index == first[0].instance_to_index and back.pixel_spacing == first[0].pixel_spacing
    # The store windows exactly as a fresh read would.
    raw = spinemm.data.read_series(store.path(*keys[0]))
    np.testing.assert_array_equal(windowed(raw).volume, back.volume)
    # A pickled store (a DataLoader worker's copy) starts with empty memory and the same cache.
    copy = pickle.loads(pickle.dumps(store))
    assert repr(copy).count("in memory=0 series") == 1 and copy.cache.cache_dir == store.cache.cache_dir


def test_store_names_an_unreadable_series_and_reads_it_once(phantom_root, tmp_path, count_reads):
    import shutil

    root = Path(shutil.copytree(phantom_root, tmp_path / "copy"))
    frame = load_tables(root, "train")
    study, series_id = (int(v) for v in frame[frame.series_id >= 0][["study_id", "series_id"]].iloc[0])
    store = SeriesStore(root, "train")
    broken = sorted(store.path(study, series_id).glob("*.dcm"))[0]
    broken.write_bytes(b"not a DICOM file")
    with pytest.raises(SpineDataError, match=broken.name):
        store.get(study, series_id)
    reads = sum(count_reads.values())
    with pytest.raises(SpineDataError, match=broken.name):  # the same error, without reading again
        store.get(study, series_id)
    with pytest.warns(UserWarning, match=f"study {study} series {series_id}: not graded"):
        assert store.find(study, series_id, "graded") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per series and action, not once per finding
        assert store.find(study, series_id, "graded") is None
    with pytest.warns(UserWarning, match="not located"):
        assert store.find(study, series_id, "located") is None
    assert sum(count_reads.values()) == reads
    with pytest.raises(SpineDataError, match="999"):
        store.get(study, 999)
    with pytest.raises(ValueError, match="split"):
        SeriesStore(root, "validation")


def test_corrupt_store_entry_is_rebuilt(phantom_root, tmp_path):
    frame = load_tables(phantom_root, "train")
    key = tuple(frame[frame.series_id >= 0][["study_id", "series_id"]].iloc[0])
    good = SeriesStore(phantom_root, "train", cache_dir=tmp_path).get(*key)
    for entry in tmp_path.glob("*/*.safetensors"):
        entry.write_bytes(entry.read_bytes()[:100])  # truncated
    store = SeriesStore(phantom_root, "train", cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="corrupt cache entry"):
        rebuilt = store.get(*key)
    assert store.decodes == 1
    np.testing.assert_array_equal(rebuilt.volume, good.volume)


def test_findings_round_trip_through_the_location_frame():
    findings = Findings(study_id=[7, 7, 8], target=[0, 24, 3], series_id=[11, -1, 12], instance_number=[4, -1, 9],
                        x=[1.5, np.nan, 3.0], y=[2.5, np.nan, 4.0], confidence=[0.9, 0.0, 0.5])
    frame = findings.to_frame()
    assert list(frame.columns) == list(spinemm.pipeline.LOCATION_COLUMNS)
    assert frame.condition.tolist() == ["spinal_canal_stenosis", "right_subarticular_stenosis", "spinal_canal_stenosis"]
    assert frame.level.tolist() == ["l1_l2", "l5_s1", "l4_l5"] and pd.isna(frame.instance_number[1])
    back = Findings.from_frame(frame)
    for name in ("study_id", "target", "series_id", "instance_number", "confidence"):
        np.testing.assert_array_equal(getattr(back, name), getattr(findings, name))
    np.testing.assert_array_equal(back.located, [True, False, True])
    moved = findings.replace(np.array([True, False, False]), x=9.0)
    assert moved.x[0] == 9.0 and findings.x[0] == 1.5  # a new record; the old one is untouched
    assert [s for s, _ in findings.by_study()] == [7, 8]
    with pytest.raises(ValueError, match="same length"):
        Findings([1], [0, 1], [1], [1], [1.0], [1.0], [1.0])


def test_pipeline_folder_round_trip_gives_the_same_predictions(phantom_root, tmp_path):
    pipeline = _untrained_pipeline()
    reference = pipeline.run(phantom_root, "test", progress=False)
    pipeline.save_pretrained(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["README.md", "detect", "grade.safetensors",
                                                                  "locate.safetensors", "pipeline.json"]
    loaded = spinemm.load_pipeline(tmp_path / "p")
    assert repr(loaded) == "SpinePipeline(stages=['detect', 'locate', 'grade'])"
    result = loaded.run(phantom_root, "test", progress=False)
    pd.testing.assert_frame_equal(result.submission(), reference.submission())
    pd.testing.assert_frame_equal(result.locations(), reference.locations())
    # A single model folder loads as the detect stage alone.
    pipeline.detect.model.save_pretrained(tmp_path / "m")
    assert spinemm.load_pipeline(tmp_path / "m").stage_names == ["detect"]
    # The first stage's output is kept beside the later ones, in the same run.
    np.testing.assert_array_equal(result.located.series_id, result.detected.series_id)
    assert not np.allclose(result.probs, result.detect_probs)


def _stages_config(phantom_root, tmp_path, out, *extra):
    from spinemm.training import load_config

    return load_config({"init_from": str(tmp_path / "detect"), "data": {"root": str(phantom_root)},
                        "split": {"val_fraction": 0.25}, "train": {"cpu": True, "mixed_precision": "no"},
                        "log": {"tensorboard": False, "progress": False}, "checkpoint": {"every_steps": 2},
                        "pipeline": {"output_dir": str(out)},
                        "locator": {"epochs": 2, "batch_size": 4, "model": {"size": 32, "channels": [8, 16, 16]}},
                        "grader": {"epochs": 2, "batch_size": 32, "model": {"size": 16, "channels": [8, 16]}}},
                       list(extra))


@pytest.mark.slow
def test_stages_stop_then_resume_match_the_uninterrupted_run(phantom_root, tmp_path):
    torch.manual_seed(0)
    spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32}).save_pretrained(tmp_path / "detect")
    reference = spinemm.training.train_stages(_stages_config(phantom_root, tmp_path, tmp_path / "ref"))
    steps = {name: reference["stages"][name]["history"][-1]["step"] for name in ("locate", "grade")}
    assert steps["locate"] >= 3 and steps["grade"] >= 3
    out = tmp_path / "run"
    # Killed inside the locate stage, then again inside the grade stage; each time resumed.
    stopped = spinemm.training.train_stages(_stages_config(phantom_root, tmp_path, out, "locator.stop_at_step=3"))
    assert stopped["stopped"] and list(stopped["stages"]) == ["locate"] and stopped["pipeline_dir"] is None
    stopped = spinemm.training.train_stages(_stages_config(phantom_root, tmp_path, out, "resume=latest",
                                                           "grader.stop_at_step=3"))
    assert stopped["stopped"] and list(stopped["stages"]) == ["locate", "grade"]
    resumed = spinemm.training.train_stages(_stages_config(phantom_root, tmp_path, out, "resume=latest"))
    assert not resumed["stopped"]
    a, b = spinemm.load_pipeline(reference["pipeline_dir"]), spinemm.load_pipeline(resumed["pipeline_dir"])
    for name in ("locate", "grade"):
        expected, got = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=f"{name}.{key}")
        assert [h["score"] for h in resumed["stages"][name]["history"]] == pytest.approx(
            [h["score"] for h in reference["stages"][name]["history"]], nan_ok=True)


@pytest.mark.parametrize("refine", [0, 1, 2])
def test_the_grade_is_the_mean_of_every_passes_probabilities(phantom_root, refine):
    """The grade stage reads a finding at its located point and at each re-centred point; its grade
    is the mean of those passes' probabilities, recomputed here crop by crop from the grader."""
    pipeline = _untrained_pipeline()
    pipeline.grade.config.refine = refine
    store = SeriesStore(phantom_root, "test")
    located = pipeline.run(phantom_root, "test", store=store, progress=False).located
    grade = pipeline.grade.eval()
    rows = np.flatnonzero(located.located)[:6]
    others = np.setdiff1d(np.arange(len(located)), rows)
    findings = located.replace(others, instance_number=-1)  # only the chosen rows are located
    assert np.array_equal(np.flatnonzero(findings.located), rows)
    grades = grade.grade(findings, store)
    assert np.isfinite(grades.log_probs[rows]).all() and np.isnan(grades.log_probs[~findings.located]).all()
    for row in rows:
        series = store.get(int(findings.study_id[row]), int(findings.series_id[row]))
        part = [(series, np.array([row]), None)]
        slices = [np.array([series.instance_to_index[int(findings.instance_number[row])]])]
        points = [np.array([[findings.x[row], findings.y[row]]])]
        target = torch.from_numpy(findings.target[[row]])
        with torch.no_grad():
            queries = grade.grader.encode_queries(None, target)
            passes = []
            for _ in range(refine + 1):
                out = grade(grade._cut(part, slices, points), target, queries=queries)
                passes.append(out["logits"].softmax(-1).double())
                slices, points = grade._moved(part, slices, points, out["offset"])
        np.testing.assert_allclose(np.exp(grades.log_probs[row]), torch.stack(passes).mean(0)[0].numpy(), rtol=1e-5)
