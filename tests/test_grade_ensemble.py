"""The grade stage as an ensemble over study-level folds and seeds: one setting, one stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import spinemm
from spinemm.data import load_tables
from spinemm.pipeline.grade import GradeEnsemble, GradeStage
from spinemm.training.config import load_config
from spinemm.training.grade_ensemble import grade_members


def test_members_cover_every_study_once_per_seed():
    config = load_config(None, ["grader.folds=5", "grader.seeds=[3, 4]"])
    members = grade_members(config, list(range(20)), list(range(20, 25)))
    assert len(members) == 10 and {m["seed"] for m in members} == {3, 4}
    for seed in (3, 4):
        vals = [set(m["val_ids"]) for m in members if m["seed"] == seed]
        assert sorted(s for v in vals for s in v) == list(range(25))  # disjoint folds covering all studies
        assert all(not v & set(m["train_ids"]) for v, m in zip(vals, [m for m in members if m["seed"] == seed],
                                                                strict=True))
    single = grade_members(load_config(), [1, 2], [3])
    assert single == [{"name": "member-0", "train_ids": [1, 2], "val_ids": [3], "seed": 0}]
    with pytest.raises(spinemm.SpineModelError, match="grader.folds"):
        grade_members(load_config(None, ["grader.folds=0"]), [1, 2], [3])


def test_a_fold_ensemble_trains_saves_loads_and_averages_its_members(phantom_root, tmp_path):
    torch.manual_seed(0)
    spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32}).save_pretrained(tmp_path / "d")
    config = {"init_from": str(tmp_path / "d"), "data": {"root": str(phantom_root)},
              "split": {"val_fraction": 0.25}, "train": {"cpu": True, "mixed_precision": "no"},
              "log": {"tensorboard": False, "progress": False},
              "pipeline": {"output_dir": str(tmp_path / "stages"), "stages": ["grade"]},
              "grader": {"epochs": 1, "batch_size": 32, "folds": 2, "model": {"size": 16, "channels": [8, 16]}}}
    trained = spinemm.training.train_stages(config)
    metrics = trained["stages"]["grade"]["metrics"]
    assert len(metrics["members"]) == 2 and np.isfinite(metrics["oof_score"])
    # every labelled study's findings are graded out of fold, once, by the member that never trained on it
    oof = pd.read_csv(trained["output_dir"] / "grade" / "oof.csv")
    assert not oof.row_id.duplicated().any() and set(oof.member) == {"member-0", "member-1"}
    assert set(oof.study_id) == set(load_tables(phantom_root, "train").study_id)
    np.testing.assert_allclose(oof[["normal_mild", "moderate", "severe"]].sum(axis=1), 1.0, atol=1e-6)

    pipeline = spinemm.load_pipeline(trained["pipeline_dir"])
    assert isinstance(pipeline.grade, GradeEnsemble) and len(pipeline.grade.members) == 2
    assert all(isinstance(m, GradeStage) for m in pipeline.grade.members)
    result = spinemm.predict(pipeline, phantom_root, split="test", progress=False)
    alone = [spinemm.SpinePipeline(pipeline.detect.model, grade=m).run(phantom_root, progress=False)
             for m in pipeline.grade.members]
    np.testing.assert_allclose(result.grade_probs, np.mean([r.grade_probs for r in alone], axis=0), atol=1e-9)
    assert not np.allclose(alone[0].grade_probs, alone[1].grade_probs)  # two graders, not one twice


def test_the_label_check_leaves_out_labels_the_folds_contradict(tmp_path):
    from spinemm.training.label_check import contradicted_labels, without_contradicted

    oof = pd.DataFrame({"study_id": [1, 1, 2, 2], "target": [0, 1, 0, 3], "label": [0, 2, 1, -1],
                        "normal_mild": [0.9, 0.7, 0.2, 0.5], "moderate": [0.05, 0.25, 0.7, 0.3],
                        "severe": [0.05, 0.05, 0.1, 0.2]})
    # recorded severe at 0.05: contradicted; recorded moderate at 0.7 and normal at 0.9: kept
    assert contradicted_labels(oof, 0.1)[["study_id", "target"]].values.tolist() == [[1, 1]]
    oof.to_csv(tmp_path / "oof.csv", index=False)
    frame = pd.DataFrame({"study_id": [1, 1, 2, 3], "target": [0, 1, 0, 1], "label": [0, 2, 1, 2]})
    kept, dropped = without_contradicted(frame, {"drop_below": 0.1, "oof_from": str(tmp_path / "oof.csv")})
    assert dropped == 1 and kept.label.tolist() == [0, -1, 1, 2] and frame.label.tolist() == [0, 2, 1, 2]
    assert without_contradicted(frame, {"drop_below": None, "oof_from": None}) == (frame, 0)
    with pytest.raises(spinemm.SpineModelError, match="oof_from"):
        without_contradicted(frame, {"drop_below": 0.1, "oof_from": None})
    (tmp_path / "bad.csv").write_text("study_id,target,label,normal_mild,moderate,severe\n1,0,x,1,0,0\n")
    with pytest.raises(spinemm.SpineModelError, match="bad.csv"):
        without_contradicted(frame, {"drop_below": 0.1, "oof_from": str(tmp_path / "bad.csv")})
