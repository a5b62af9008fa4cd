"""The report's pictures: what the grader attended to, grade-coloured overlays, per-level grade tables,
every stage's curves and the one page that shows them."""

from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
import torch

import spinemm
from spinemm import viz
from spinemm.constants import LABEL_COLUMNS, SUBMISSION_COLUMNS, row_id
from spinemm.models.config import GraderConfig, LocatorConfig
from spinemm.models.crop_grader import CropGrader
from spinemm.pipeline import GradeStage, LocateStage, SpinePipeline
from spinemm.text import finding_texts


def _clip_stage(tower: str | None = None) -> GradeStage:
    from spinemm.models.baselines import TINY_VISION_CONFIGS

    torch.manual_seed(0)
    overrides = {"vision": TINY_VISION_CONFIGS[tower]} if tower else {}
    encoder = spinemm.create_model("spine-tiny", num_slices=4, **overrides)
    return GradeStage(GraderConfig(backbone="clip", size=32, layers=2), encoder=encoder).eval()


@pytest.mark.parametrize("tower", [None, "cnn", "unet3d"])
def test_grader_attention_leaves_the_outputs_alone(tower):
    stage = _clip_stage(tower)
    assert isinstance(stage.grader, CropGrader)
    crops, targets = torch.rand(3, 3, 32, 32), torch.tensor([0, 12, 24])
    texts = finding_texts(types.SimpleNamespace(pixel_spacing=(0.7, 0.7), slice_spacing=4.0,
                                                normal=np.array([0.0, 0.0, 1.0])), targets.tolist())
    with torch.no_grad():
        plain = stage.grader(crops, targets, texts)
        seen = stage.grader(crops, targets, texts, need_attention=True)
    for key in ("logits", "offset"):
        torch.testing.assert_close(seen[key], plain[key], atol=1e-5, rtol=1e-5)
    slices, h, w = stage.grader.token_grid()
    assert seen["attention"].shape == (3, 2, 1 + slices * h * w)  # [N, layers, pooled + tokens]
    torch.testing.assert_close(seen["attention"].sum(-1), torch.ones(3, 2))
    assert "attention" not in plain


@pytest.fixture(scope="module")
def graded_run(phantom_root):
    torch.manual_seed(0)
    detect = spinemm.create_model("spine-tiny", num_slices=4)
    pipeline = SpinePipeline(detect, LocateStage(LocatorConfig(size=32, channels=(8, 16, 16))), _clip_stage())
    store = spinemm.data.store.SeriesStore(phantom_root, "test")
    return pipeline, pipeline.run(phantom_root, "test", store=store, progress=False), store


def test_grade_stage_attention_is_of_the_crops_the_run_graded(graded_run):
    pipeline, result, store = graded_run
    rows = np.flatnonzero(~np.isnan(result.grade_log_probs[:, 0]))[:5]
    seen = pipeline.grade.attention(result.graded, store, rows)
    # the crops are cut where the last pass read them: with one re-centring, the run's grade is the
    # mean of the reads at the located point (the first pass) and at the graded point
    assert pipeline.grade.config.refine == 1
    first = pipeline.grade.attention(result.located, store, rows)
    mean = (first["log_probs"].exp() + seen["log_probs"].exp()).numpy() / 2
    np.testing.assert_allclose(mean, np.exp(result.grade_log_probs[rows]), atol=1e-4)
    slices, h, w = pipeline.grade.grader.token_grid()
    assert seen["attention"].shape == (5, slices, h, w) and seen["crops"].shape == (5, 3, 32, 32)
    total = seen["attention"].flatten(1).sum(1) + seen["pooled"]
    torch.testing.assert_close(total, torch.ones(5))


def test_overlays_are_coloured_by_predicted_grade(graded_run, phantom_root, tmp_path, monkeypatch):
    _, result, store = graded_run
    drawn = []
    real = viz.plot_slices_with_points
    monkeypatch.setattr(viz, "plot_slices_with_points", lambda panels, out, title=None: drawn.append(panels)
                        or real(panels, out, title))
    submission = result.submission()
    paths = viz.location_overlays(phantom_root, result.locations(), tmp_path, max_studies=1, store=store,
                                  submission=submission)
    assert paths[0].stat().st_size > 10_000
    grades = viz.predicted_grades(submission).set_index(["study_id", "condition", "level"])
    points = [p for panel in drawn[0] for p in panel["points"]]
    assert points
    for _, _, label, color in points:
        assert color in viz.GRADE_COLORS.values()
        grade = next(g for g, c in viz.GRADE_COLORS.items() if c == color)
        assert f"{grade} " in label and label.endswith("%")
    study = int(result.study_ids[0])
    assert set(grades.loc[study].grade) >= {next(g for g, c in viz.GRADE_COLORS.items() if c == points[0][3])}


def test_grade_table_lays_out_levels_by_condition():
    from spinemm.report import grade_table, grade_table_html

    probs = np.tile([0.7, 0.2, 0.1], (25, 1))
    probs[LABEL_COLUMNS.index("spinal_canal_stenosis_l4_l5")] = [0.1, 0.3, 0.6]
    submission = pd.DataFrame({"row_id": [row_id(7, c) for c in LABEL_COLUMNS],
                               **{c: probs[:, k] for k, c in enumerate(SUBMISSION_COLUMNS)}})
    solution = pd.DataFrame({"row_id": [row_id(7, "spinal_canal_stenosis_l4_l5"), row_id(7, "spinal_canal_stenosis_l1_l2")],
                             "normal_mild": [0, 1], "moderate": [1, 0], "severe": [0, 0], "sample_weight": [2.0, 1.0]})
    table = grade_table(submission, 7, solution)
    assert table.shape == (5, 5) and list(table.index) == ["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]
    assert table.loc["L4/L5", "Spinal Canal Stenosis"] == "Severe 60% (recorded Moderate)"
    assert table.loc["L1/L2", "Spinal Canal Stenosis"] == "Normal/Mild 70% ✓"
    assert table.loc["L1/L2", "Left Subarticular Stenosis"] == "Normal/Mild 70%"  # nothing recorded
    page = grade_table_html(table)
    assert page.count("<tr>") == 6 and viz.GRADE_COLORS["Severe"] in page


def test_stage_curves_and_the_page(tmp_path):
    from spinemm.report import write_index

    history = [{"epoch": e, "train_loss": 1 / e, "score": 0.9 - 0.01 * e} for e in range(1, 4)]
    png = viz.stage_curves_png([{"title": "detect", "history": history, "keys": {"score": "val score"}},
                                {"title": "grade", "history": history, "keys": {"score": "val score"}},
                                {"title": "never trained", "history": [], "keys": {}}], tmp_path / "curves.png")
    assert png.stat().st_size > 10_000
    page = write_index(tmp_path, "report", [("first", "<p>a</p>"), ("second <b>", "<p>b</p>")])
    text = page.read_text()
    assert text.index("first") < text.index("second &lt;b&gt;")
