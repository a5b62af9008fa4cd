"""The benchmark scripts run (tiny settings); their numbers are recorded in benchmarks/RESULTS.md."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

# every test runs a benchmark script end to end
pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_model_step_benchmark_runs_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("model_step", BENCHMARKS / "model_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--size", "tiny", "--batch", "1", "--steps", "1", "--warmup", "0", "--device", "cpu"])
    assert [r["name"] for r in rows] == ["vision tower alone (anchor)", "SpineCLIP step (studies)"]
    assert all(r["seconds"] > 0 and math.isfinite(r["images_per_s"]) for r in rows)
    assert "| SpineCLIP step (studies) |" in capsys.readouterr().out


def test_heldout_quality_benchmark_scores_a_pipeline(phantom_root, tmp_path, capsys):
    import torch

    import spinemm
    from spinemm.models.config import GraderConfig, LocatorConfig
    from spinemm.pipeline import GradeStage, LocateStage, SpinePipeline

    torch.manual_seed(0)
    detect = spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32})
    SpinePipeline(detect, LocateStage(LocatorConfig(size=32, channels=(8, 16, 16))),
                  GradeStage(GraderConfig(backbone="cnn", size=16, channels=(8, 16)), query_dim=detect.config.fusion.dim)
                  ).save_pretrained(tmp_path / "p")
    spec = importlib.util.spec_from_file_location("heldout_quality", BENCHMARKS / "heldout_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--pipeline", str(tmp_path / "p"), "--train-root", str(phantom_root),
                       "--sets", str(tmp_path / "sets"), "--n", "3", "--seed", "5"])
    prior, oracle = out["test_prior"], out["test_oracle"]
    for key in ("test_detect", "test_pipeline"):
        score = out[key]["score"]
        assert out[key]["gap_closed"] == pytest.approx((prior - score) / (prior - oracle))
    assert out["test_detect"]["score"] != out["test_pipeline"]["score"]  # the later stages changed the grades
    assert out["locations"]["n_rows"] > 0 and 0 < out["locations"]["median_mm"] < 200
    # the labelled set's gap, split by stage: the grade stage read again at the recorded points
    labelled, prior, oracle = out["labelled"], out["labelled_prior"], out["labelled_oracle"]
    assert set(labelled) == {"detect", "pipeline", "grade_at_labels"} and oracle < prior
    for numbers in labelled.values():
        assert numbers["gap_closed"] == pytest.approx((prior - numbers["score"]) / (prior - oracle))
    assert labelled["pipeline"]["score"] == out["labelled_pipeline"]
    assert labelled["grade_at_labels"]["score"] != labelled["pipeline"]["score"]  # read at other points
    assert "| 3 test studies |" in capsys.readouterr().out


def test_heldout_quality_grades_again_at_the_recorded_points(phantom_root, tmp_path, monkeypatch):
    import torch

    import spinemm
    from spinemm.data.store import SeriesStore
    from spinemm.models.config import GraderConfig, LocatorConfig
    from spinemm.pipeline import GradeStage, LocateStage, SpinePipeline

    torch.manual_seed(0)
    detect = spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32})
    pipeline = SpinePipeline(detect, LocateStage(LocatorConfig(size=32, channels=(8, 16, 16))),
                             GradeStage(GraderConfig(backbone="cnn", size=16, channels=(8, 16)),
                                        query_dim=detect.config.fusion.dim)).eval()
    frame = spinemm.data.load_tables(phantom_root, "train")
    ids = sorted(int(s) for s in frame.study_id.unique())[:2]
    frame = frame[frame.study_id.isin(ids)]
    store = SeriesStore(phantom_root, "train")
    result = spinemm.predict(pipeline, phantom_root, "train", study_ids=ids, store=store, progress=False)
    seen = {}
    run = pipeline.grade.run

    def watched(inputs):
        seen["findings"] = inputs.findings
        return run(inputs)

    monkeypatch.setattr(pipeline.grade, "run", watched)
    probs = _benchmark("heldout_quality").graded_at_labels(pipeline, result, frame, store)
    assert probs.shape == (2, 25, 3) and np.allclose(probs.sum(-1), 1)
    given = seen["findings"].to_frame().set_index(["study_id", "condition", "level"])
    known = frame.dropna(subset=["x"]).set_index(["study_id", "condition", "level"])
    assert len(known) > 10
    np.testing.assert_allclose(given.loc[known.index, ["x", "y"]].to_numpy(), known[["x", "y"]].to_numpy())
    assert (given.loc[known.index, "instance_number"].to_numpy() == known.instance_number.to_numpy()).all()


def _benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared helpers (anchors.py)
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_predict_throughput_benchmark_times_parts_and_counts_one_read_per_file(phantom_root, tmp_path, capsys):
    import torch

    import spinemm

    torch.manual_seed(0)
    spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32}).save_pretrained(tmp_path / "m")
    text = _benchmark("predict_throughput").main([str(tmp_path / "m"), "--root", str(phantom_root), "--runs", "0:1",
                                                  "2:1", "--repeats", "1"])
    assert "| predict, 1 core |" in text and "| predict, 2 workers |" in text
    assert "| bare decode, 2 processes |" in text
    assert "1.0 dcmread calls per file" in text and "| decode + window |" in text and "| detect model |" in text
    assert text in capsys.readouterr().out


@pytest.mark.slow
def test_cache_scale_benchmark_reports_each_size(phantom_root):
    text = _benchmark("cache_scale").main([str(phantom_root), "--sizes", "4", "8", "--workers", "2"])
    rows = [line for line in text.splitlines() if line.startswith("| 4 |") or line.startswith("| 8 |")]
    assert len(rows) == 2 and "Extrapolated to the Kaggle train set" in text


# The train and inference throughput scripts run on the CPU in
# tests/test_base_presets.py::test_gpu_check_dry_run_writes_one_table (the GPU check's dry run).




def test_seed_spread_reports_each_seed_and_resumes_without_training_again(tmp_path, capsys, monkeypatch):
    import json
    import subprocess

    spec = importlib.util.spec_from_file_location("seed_spread", BENCHMARKS / "seed_spread.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for seed, (gap, within) in {0: (0.75, 0.96), 1: (0.70, 0.92), 2: (0.62, 0.90)}.items():
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        split = {"labelled": {"pipeline": {"gap_closed": gap - 0.02}, "grade_at_labels": {"gap_closed": gap}}}
        (folder / "heldout.json").write_text(json.dumps({
            "test_detect": {"gap_closed": 0.1}, "test_pipeline": {"score": 0.5, "gap_closed": gap},
            "locations": {"within_5mm": within}, **(split if seed else {})}))  # seed 0: before the split

    def no_training(*args, **kwargs):
        raise AssertionError("a seed with results was trained again")

    monkeypatch.setattr(subprocess, "run", no_training)
    results = module.main(["--seeds", "0", "1", "2", "--out", str(tmp_path)])
    assert sorted(results) == [0, 1, 2]
    table = capsys.readouterr().out
    assert "| mean | 10.0% | | 69.0% | 92.7% |" in table
    assert "| sd | 0.0% | | 6.6% | 3.1% |" in table and "| worst | 10.0% | | 62.0% | 90.0% |" in table
    assert "| 0 | 10.0% | 0.5000 | 75.0% | 96.0% | nan% | nan% |" in table  # no split by stage yet
    assert "| mean | 10.0% | | 69.0% | 92.7% | 64.0% | 66.0% |" in table  # over the seeds that have it
    assert json.loads((tmp_path / "spread.json").read_text())["1"]["test_pipeline"]["gap_closed"] == 0.70


def test_grade_ablation_scores_the_label_check_against_the_phantoms_truth(tmp_path):
    """Precision and recall of the flagged labels, from an oof.csv and a phantom_truth.csv."""
    import pandas as pd

    grade_ablation = _benchmark("grade_ablation")
    demo, out = tmp_path / "demo", tmp_path / "out" / "demo"
    (demo / "phantom").mkdir(parents=True)
    (out / "folds5" / "grade").mkdir(parents=True)
    columns = ["spinal_canal_stenosis_l1_l2", "spinal_canal_stenosis_l2_l3", "spinal_canal_stenosis_l3_l4"]
    pd.DataFrame({"study_id": [7, 7, 7, 8], "split": ["train"] * 3 + ["test"], "column": columns + columns[:1],
                  "true_label": [0, 0, 1, 0], "recorded_label": [0, 2, 1, 2], "latent_severity": 0.0}) \
        .to_csv(demo / "phantom" / "phantom_truth.csv", index=False)
    # flagged: row 1 (recorded severe at 0.02, truly noisy) and row 2 (recorded moderate at 0.05, clean)
    pd.DataFrame({"row_id": [f"7_{c}" for c in columns], "study_id": 7, "target": [0, 1, 2], "label": [0, 2, 1],
                  "member": "member-0", "normal_mild": [0.9, 0.9, 0.9], "moderate": [0.05, 0.08, 0.05],
                  "severe": [0.05, 0.02, 0.05]}).to_csv(out / "folds5" / "grade" / "oof.csv", index=False)
    check = grade_ablation.label_check_quality(demo, out)
    assert check == {"flagged": 2, "noisy_labels": 1, "labels": 3, "precision": 0.5, "recall": 1.0}
