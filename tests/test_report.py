"""The report's pictures: what the grader attended to, grade-coloured overlays, per-level grade tables,
every stage's curves and the one page that shows them."""

from __future__ import annotations

import io
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
    monkeypatch.setattr(viz, "plot_slices_with_points", lambda panels, out, title=None, note=None: drawn.append(panels)
                        or real(panels, out, title, note))
    submission = result.submission()
    paths = viz.location_overlays(phantom_root, result.locations(), tmp_path, max_studies=1, store=store,
                                  submission=submission)
    assert paths[0].stat().st_size > 10_000
    grades = viz.predicted_grades(submission).set_index(["study_id", "condition", "level"])
    study = int(result.study_ids[0])
    marks = [(m, legend) for panel in drawn[0] for m, legend in zip(panel["points"], panel["legend"], strict=True)]
    assert len(marks) == int((result.locations().study_id == study).sum())  # every finding: all were located
    for mark, (text, color) in marks:
        grade = next(g for g, c in viz.GRADE_COLORS.items() if c == mark.color)
        assert color == mark.color and f": {grade} " in text and "%" in text
        assert mark.label.split()[0] in ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")
    assert set(grades.loc[study].grade) >= {next(g for g, c in viz.GRADE_COLORS.items() if c == marks[0][0].color)}


def _recorded_as_predicted(root, study_id: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train tables of ``root`` and a location frame of one study that predicts its recorded points."""
    truth = spinemm.data.load_tables(root, "train")
    rows = truth[(truth.study_id == study_id) & truth.instance_number.notna()]
    locations = pd.DataFrame({"study_id": rows.study_id, "condition": rows.condition, "level": rows.level,
                              "series_id": rows.series_id, "instance_number": rows.instance_number.astype("Int64"),
                              "x": rows.x, "y": rows.y, "confidence": 1.0}).reset_index(drop=True)
    return truth, locations


def test_overlays_draw_every_finding_recorded_points_and_flag_points_off_the_image(phantom_root, tmp_path,
                                                                                    monkeypatch):
    frame = spinemm.data.load_tables(phantom_root, "train")
    counts = frame[frame.instance_number.notna()].groupby("study_id").size()
    study = int(counts[counts == 25].index[0])  # a study with every finding recorded
    truth, locations = _recorded_as_predicted(phantom_root, study)
    assert len(locations) == 25
    locations.loc[0, "x"] = -30.0  # off the image
    gone = locations.loc[1]
    locations.loc[1, ["series_id", "instance_number", "x", "y"]] = [-1, pd.NA, np.nan, np.nan]  # not located
    drawn = []
    real = viz.plot_slices_with_points
    monkeypatch.setattr(viz, "plot_slices_with_points", lambda panels, out, title=None, note=None: drawn.append(
        (panels, note)) or real(panels, out, title, note))
    paths = viz.location_overlays(phantom_root, locations, tmp_path, split="train", truth=truth)
    assert len(paths) == 1 and paths[0].stat().st_size > 20_000
    panels, note = drawn[0]
    predicted = [(m, p) for p in panels for m in p["points"] if not m.recorded]
    recorded = [(m, p) for p in panels for m in p["points"] if m.recorded]
    # every located finding and every recorded point, each on the panel of its own slice (not only
    # those on the plane's most common slice: the subarticular findings lie on five axial slices)
    assert len(predicted) == 24 and len(recorded) == 25
    assert len({p["title"] for p in panels}) == len(panels) > 3
    for (mark, panel), row in zip(sorted(predicted, key=lambda mp: (mp[0].x, mp[0].y)),
                                  locations.drop(index=1).sort_values(["x", "y"]).itertuples(), strict=True):
        assert panel["title"].endswith(f"series {row.series_id} · instance {row.instance_number}")
        assert mark.side == {"left": "L", "right": "R"}.get(row.condition.split("_")[0])
    assert {m.side for m, _ in recorded} == {None, "L", "R"}
    assert "1 of 24 predicted points lie outside their image" in note
    assert f"not located: {viz.finding_label(gone.condition, gone.level)}" in note
    flagged = [text for p in panels for text, _ in p["legend"] if "outside the image at (-30," in text]
    assert flagged == [f"{viz.finding_label(locations.condition[0], locations.level[0])}: located, outside the image "
                       f"at (-30, {locations.y[0]:.0f})"]


def test_labels_do_not_overprint_and_a_point_off_the_image_is_flagged_at_its_edge():
    from matplotlib.text import Text

    from spinemm.marks import Mark, draw_marks

    plt = viz._pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(np.random.default_rng(0).random((48, 48)), cmap="gray")
    marks = [Mark(20 + k % 3, 21, f"L{k}/L{k + 1}", "#2ca02c", side=("L", "R", None)[k % 3]) for k in range(10)]
    texts = draw_marks(ax, [*marks, Mark(-20, 60, "L5/S1 R", "#d62728", side="R")], (48, 48))
    fig.savefig(io.BytesIO(), format="png")  # as saved: the layout the boxes are measured in
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in texts]
    assert len(boxes) == 11
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 - 1 <= a.x0 and a.x1 <= frame.x1 + 1 and frame.y0 - 1 <= a.y0 and a.y1 <= frame.y1 + 1
        for b in boxes[i + 1:]:
            assert min(a.x1, b.x1) <= max(a.x0, b.x0) or min(a.y1, b.y1) <= max(a.y0, b.y0), (a, b)
    assert ax.get_xlim() == (-0.5, 47.5) and ax.get_ylim() == (47.5, -0.5)  # the view stays on the image
    assert texts[-1].get_text() == "L5/S1 R outside"
    flag = ax.collections[-1]
    assert flag.get_offsets().tolist() == [[0.0, 47.0]]  # drawn at the nearest edge
    plt.close(fig)


def test_grader_attention_flags_a_point_off_its_image_and_shows_colour_bars(tmp_path, monkeypatch):
    saved = []
    real = viz._save
    monkeypatch.setattr(viz, "_save", lambda fig, out: saved.append(fig) or real(fig, out))
    rng = np.random.default_rng(0)
    items = [{"crop": rng.random((3, 32, 32)), "attention": rng.random((2, 4, 4)), "title": "on the image"},
             {"crop": np.zeros((3, 32, 32)), "attention": rng.random((2, 4, 4)), "title": "off",
              "outside": "at (60, -4) on a 48 x 48 px slice"}]
    assert viz.attention_png(items, tmp_path / "a.png").stat().st_size > 10_000
    fig = saved[0]
    top_on, top_off, bottom_on, bottom_off = fig.axes[:4]
    assert top_on.get_images() and bottom_on.get_images()
    assert not top_off.get_images() and not bottom_off.get_images()  # no black square
    assert any("OUTSIDE ITS IMAGE" in t.get_text() and "(60, -4)" in t.get_text() for t in top_off.texts)
    bars = fig.axes[4:]
    assert len(bars) == 1 and "token weight" in bars[0].get_xlabel()


def test_numbers_that_mean_nothing_learnt_get_a_note():
    from spinemm.demo_report import reading_notes
    from spinemm.report import better

    summary = {"official_score": 1.25, "prior_score": 1.2, "oracle_score": 0.3, "gap_closed": -0.06,
               "fusion_only_score": 1.1, "zero_shot": {"balanced_accuracy": 0.167, "chance": 1 / 3, "n_crops": 50},
               "evaluation": {"classification": {"balanced_accuracy": 1 / 3, "accuracy": 0.6},
                              "per_condition": {"spinal": {"log_loss": 1.2, "balanced_accuracy": 0.5}}},
               "grader": {"val": {"locator_val_median_mm": 160.6, "locator_val_within_5mm": 0.0}},
               "settings": {"epochs": 0}, "seconds": 0.0}
    notes = reading_notes(summary)
    assert notes == {"official_score": "no better than the prior alone (1.2000)",
                     "fusion_only_score": "no better than 1/3 for every grade (1.099)",
                     "gap_closed": "the model is no better than the prior",
                     "zero_shot.balanced_accuracy": "below chance (0.333)",
                     "evaluation.classification.balanced_accuracy": "at chance (0.333): one grade for everything",
                     "evaluation.per_condition.spinal.log_loss": "no better than 1/3 for every grade (1.099)",
                     "grader.val.locator_val_median_mm": "no located level within 5 mm",
                     "grader.val.locator_val_within_5mm": "no located level within 5 mm"}
    assert [better(k) for k in ("official_score", "evaluation.per_condition.spinal.log_loss", "gap_closed",
                                "grader.val.locator_val_median_mm", "zero_shot.n_crops", "prior_score")] == [
        "lower is better", "lower is better", "higher is better", "lower is better", "",
        "reference: the class prior alone"]


def test_a_smoke_run_page_says_so_and_a_real_one_does_not(tmp_path):
    from spinemm.demo_report import write_report_page

    summary = {"official_score": 0.9, "prior_score": 1.2, "oracle_score": 0.3, "gap_closed": 0.33,
               "fusion_only_score": 1.0, "zero_shot": {"balanced_accuracy": 0.6, "chance": 1 / 3, "n_crops": 50},
               "settings": {"n_studies": 8, "n_test": 3, "phantom_size": 48, "epochs": 1}, "smoke_run": True}
    pictures = {"overlays": [], "attention": None, "attention_note": "no attention", "tables": [],
                "outside": (0, 75), "single_epoch": ["detect stage"]}
    smoke = write_report_page(tmp_path, summary, pictures).read_text()
    assert "Smoke run" in smoke and "are expected here" in smoke
    assert "One epoch, so one point and no curve: detect stage." in smoke
    assert smoke.index("Read this first") < smoke.index("Held-out score")
    assert "<td>0.9000</td><td>lower is better</td>" in smoke and "<td>33%</td><td>higher is better</td>" in smoke
    real = write_report_page(tmp_path, {**summary, "smoke_run": False}, {**pictures, "single_epoch": []}).read_text()
    assert "Read this first" not in real and "Smoke run" not in real
    flagged = write_report_page(tmp_path, {**summary, "smoke_run": False}, {**pictures, "outside": (71, 75)})
    assert "71 of 75 located points lie outside their image" in flagged.read_text()


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
