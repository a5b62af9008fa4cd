"""Regression guard for what ships: the trained pipeline on a small fixed phantom, end to end.

A reduced demo (same stages, fewer studies and epochs) must score clearly below the prior-only
score on its held-out studies, and its located points must lie near the labels. A model that
predicts the prior, a constant, or a finding on the wrong disc fails both.
"""

from __future__ import annotations

import numpy as np
import pytest

import spinemm
from spinemm.demo import run_demo
from spinemm.pipeline.location_errors import location_errors, summarize_errors

#: The fixed run: phantom seed 0, 64 training and 16 test studies at 64 px (about a minute on 2 cores).
#: Without side folding: on these 51 training studies the folded grader's validation score rose
#: from epoch 10 on (0.936 -> 1.038, train loss falling) in the suite's one-thread arithmetic and
#: not on two threads (the pipeline scored 0.930 and 0.898; RESULTS.md, 2026-12-07). Folding is
#: measured where the demo runs it: 160 studies, five seeds, every seed better.
SMALL = {"n_studies": 64, "n_test": 16, "phantom_size": 64, "image_size": 32, "num_slices": 6,
         "pretrain_epochs": 2, "epochs": 5, "locator_epochs": 15, "grader_epochs": 25, "batch_size": 4,
         "fold_sides": False}


@pytest.mark.slow
def test_small_pipeline_beats_the_prior_and_finds_the_levels(tmp_path):
    summary = run_demo(tmp_path, seed=0, settings=SMALL)
    prior, score = summary["prior_score"], summary["official_score"]
    # Measured 2026-12-03 with the grader on pretraining's conv tower (benchmarks/RESULTS.md, issue 12):
    # 0.896 against a prior of 1.079 and 0.920 for the first stage alone, now trained from scratch
    # (the ViT-initialised first stage scored 0.973 with 0.911 for the pipeline). The margins leave
    # room for numeric noise, not for a model that stopped learning (the prior scores 0 below itself)
    # or a grader that adds nothing to the first stage.
    assert score < prior - 0.12, (score, prior)
    assert score < summary["fusion_only_score"] - 0.01, (score, summary["fusion_only_score"])  # later stages add

    # Located points of the validation studies (no stage trained on them) against their labels.
    from spinemm.training import load_config
    from spinemm.training.common import split_studies

    root = tmp_path / "phantom"
    frame = spinemm.data.load_tables(root, "train")
    _, val_ids = split_studies(frame, load_config(tmp_path / "stages" / "config.yaml"))
    result = spinemm.predict(summary["model_dir"], root, "train", study_ids=val_ids, progress=False)
    errors = summarize_errors(location_errors(root, "train", result.locations(), frame))
    assert errors["n_rows"] > 100
    # measured: median 5.4 mm, 62% within 10 mm (64 px images: about 3 mm pixels); a constant or
    # wrong-disc prediction is tens of mm off
    assert errors["median_mm"] < 7.0 and errors["within_10mm"] > 0.5, errors
    assert np.isfinite(summary["zero_shot"]["balanced_accuracy"])
