"""The second stage: ROI crops of the original slices, the grader, train_grader and two-stage predict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import spinemm
from spinemm.constants import NUM_TARGETS
from spinemm.data import load_tables, read_series, series_path
from spinemm.data.roi import ROIWindows, crop_roi
from spinemm.errors import SpineModelError


def _dot_volume(depth=5, size=40, at=(3, 17, 23)):
    """Zeros with one bright pixel at (slice, y, x)."""
    volume = torch.zeros(depth, size, size)
    volume[at] = 1.0
    return volume


def test_crop_roi_centres_the_point_and_picks_neighbour_slices():
    volume = _dot_volume()
    # 1 mm pixels, a 9 mm crop at 9 px: the crop is the 9x9 block around (x=23, y=17), no resampling
    crop = crop_roi(volume, (1.0, 1.0), 3, x=23, y=17, side_mm=9, size=9, slice_offsets=(-1, 0, 1))
    assert crop.shape == (3, 9, 9)
    assert crop[1, 4, 4] == pytest.approx(1.0) and crop[1].sum() == pytest.approx(1.0)
    assert crop[0].sum() == 0 and crop[2].sum() == 0  # the dot is only on slice 3
    # The side is in mm: with 0.5 mm pixels the 9 px crop spans 18 source pixels, still centred on the dot.
    fine = crop_roi(volume, (0.5, 0.5), 3, x=23, y=17, side_mm=9, size=9)
    assert np.unravel_index(int(fine[1].argmax()), (9, 9)) == (4, 4)
    # Slices past either end are clamped, not wrapped.
    edge = crop_roi(volume, (1.0, 1.0), 4, x=23, y=17, side_mm=9, size=9)
    assert torch.equal(edge[1], edge[2])


def test_roi_windows_offsets_point_at_the_label(phantom_root):
    frame = load_tables(phantom_root, "train")
    studies = sorted(frame.study_id.unique())[:3]
    windows = ROIWindows(phantom_root, frame, studies, side_mm=60, size=16, shift=0.25, slice_jitter=1, progress=False)
    usable = frame[frame.study_id.isin(studies)]
    usable = usable[usable.instance_number.notna() & (usable.label >= 0)]
    assert len(windows) == len(usable) and windows.skipped == int(frame.study_id.isin(studies).sum() - len(usable))
    assert windows.windows.shape[1:] == (5, 16 + 2 * windows.pad, 16 + 2 * windows.pad)
    centre, offset = windows.crops(torch.arange(len(windows)))
    assert centre.shape == (len(windows), 3, 16, 16) and torch.equal(offset, torch.zeros(len(windows), 3))
    # A shifted crop is the centred crop moved by the offset it reports.
    shifted, offset = windows.crops(torch.arange(len(windows)), torch.Generator().manual_seed(0))
    assert offset.abs().amax() > 0
    for i in range(len(windows)):
        dx, dy = (offset[i, :2] * 16).round().long().tolist()
        dk = int(offset[i, 2])
        full = windows.windows[i].float()
        y0, x0 = windows.pad - dy, windows.pad - dx
        assert torch.equal(shifted[i], full[windows.slice_jitter - dk:windows.slice_jitter - dk + 3, y0:y0 + 16, x0:x0 + 16])


def test_grader_is_off_until_added_and_survives_save_load(tmp_path):
    torch.manual_seed(0)
    model = spinemm.create_model("spine-tiny", num_slices=4).eval()
    assert model.grader is None
    with pytest.raises(SpineModelError, match="add_grader"):
        model.grade(torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))
    with pytest.raises(SpineModelError, match="valid options"):
        model.add_grader(side_millimetres=50)
    model.add_grader(size=16, channels=[8, 16]).eval()
    crops, targets = torch.rand(4, 3, 16, 16), torch.tensor([0, 5, 10, 24])
    out = model.grade(crops, targets)
    assert out["logits"].shape == (4, 3) and out["offset"].shape == (4, 3)
    model.save_pretrained(tmp_path / "m")
    loaded = spinemm.load_model(tmp_path / "m").eval()
    assert loaded.config.grader.enabled and loaded.config.grader.channels == (8, 16)
    torch.testing.assert_close(loaded.grade(crops, targets)["logits"], out["logits"], rtol=0, atol=0)
    with pytest.raises(SpineModelError, match="crops must be"):
        model.grade(torch.rand(2, 5, 16, 16), targets[:2])


def test_learned_queries_tell_left_from_right():
    torch.manual_seed(0)
    model = spinemm.create_model("spine-tiny", num_slices=4)
    assert model.query_embed is not None and model.query_embed.shape == (NUM_TARGETS, model.config.fusion.dim)
    with torch.no_grad():
        queries = torch.nn.functional.normalize(model.encode_queries(None, 1)[0], dim=-1)
    # left vs right foraminal at L1/L2 (columns 5 and 10) are far apart from the start
    assert float(queries[5] @ queries[10]) < 0.9
    plain = spinemm.create_model("spine-tiny", num_slices=4, **{"fusion.learned_queries": False})
    assert plain.query_embed is None


def test_train_grader_then_two_stage_predict(phantom_root, tmp_path):
    torch.manual_seed(0)
    fusion = spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32})
    fusion.save_pretrained(tmp_path / "fusion")
    config = {
        "init_from": str(tmp_path / "fusion"),
        "data": {"root": str(phantom_root)},
        "split": {"val_fraction": 0.25},
        "train": {"cpu": True, "mixed_precision": "no"},
        "log": {"tensorboard": False, "progress": False},
        "grader": {"output_dir": str(tmp_path / "grader"), "epochs": 2, "batch_size": 16,
                   "model": {"size": 16, "channels": [8, 16]}},
    }
    result = spinemm.training.train_grader(config)
    assert len(result["history"]) == 2 and all(np.isfinite(h["train_loss"]) for h in result["history"])
    metrics = result["metrics"]
    assert np.isfinite(metrics["score"]) and np.isfinite(metrics["fusion_score"]) and metrics["train_rows"] > 0
    assert np.isfinite(metrics["grader_score"]) and "study_context" in metrics  # on by default in the recipe
    # Only the grader trained: the fusion weights are those it was loaded from.
    model = spinemm.load_model(result["model_dir"]).eval()
    context = model.grader.study_context
    assert context is not None and context.log_temperature.item() == pytest.approx(metrics["study_context"]["log_temperature"])
    for name, value in spinemm.load_model(tmp_path / "fusion").state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)

    submission, locations = spinemm.predict(model, phantom_root, split="test", progress=False)
    assert len(submission) == len(locations) == 25 * 3
    np.testing.assert_allclose(submission[["normal_mild", "moderate", "severe"]].sum(axis=1), 1.0, atol=1e-6)
    # The grader's probabilities replace the fusion model's, and its re-centred points are real slices.
    grader, model.grader = model.grader, None
    fusion_submission, fusion_locations = spinemm.predict(model, phantom_root, split="test", progress=False)
    model.grader = grader
    assert not np.allclose(submission.iloc[:, 1:].to_numpy(float), fusion_submission.iloc[:, 1:].to_numpy(float))
    for (study, series_id), rows in locations[locations.series_id >= 0].groupby(["study_id", "series_id"]):
        series = read_series(series_path(phantom_root, "test", study, series_id))
        assert set(rows.instance_number.astype(int)) <= set(series.instance_to_index)


def test_train_grader_needs_a_fusion_model(phantom_root, tmp_path):
    with pytest.raises(SpineModelError, match="init_from"):
        spinemm.training.train_grader({"data": {"root": str(phantom_root)},
                                       "grader": {"output_dir": str(tmp_path / "g")}})


def test_val_solution_matches_the_frame(phantom_root):
    from spinemm.training.grader import val_solution

    frame = load_tables(phantom_root, "train")
    studies = sorted(frame.study_id.unique())[:2]
    solution = val_solution(frame, studies)
    labelled = frame[frame.study_id.isin(studies) & (frame.label >= 0)]
    assert len(solution) == len(labelled)
    one_hot = solution.set_index("row_id")[["normal_mild", "moderate", "severe"]].to_numpy().argmax(1)
    expected = pd.Series(labelled.label.to_numpy(), index=[f"{s}_{c}" for s, c in zip(labelled.study_id, labelled.column, strict=True)])
    np.testing.assert_array_equal(one_hot, expected.loc[solution.row_id].to_numpy())
