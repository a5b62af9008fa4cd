"""The grade stage: ROI crops of the original slices, the grader, train_stages and staged predict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import spinemm
from spinemm.constants import NUM_TARGETS
from spinemm.data import load_tables, read_series, series_path
from spinemm.data.roi import ROIWindows, crop_roi
from spinemm.errors import SpineModelError
from spinemm.models.config import GraderConfig
from spinemm.pipeline import GradeStage, SpinePipeline, load_pipeline


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_crops_cut_from_windows_equal_sampling_the_whole_slice(dtype):
    """crop_rois resamples from a small window around each crop: the same values as sampling the
    whole slice with zero padding, for crops inside, across the edge of and outside the image."""
    from spinemm.data.roi import crop_rois

    torch.manual_seed(0)
    volume = torch.rand(5, 40, 56).to(dtype)
    xs, ys, ks = [20.3, 0.0, 55.0, -9.0, 70.5], [11.7, 39.0, 0.4, 20.0, -12.0], [2, 0, 4, 3, 1]
    spacing, side_mm, size, offsets = (0.7, 0.9), 12.0, 12, (-1, 0, 1)  # under 2 pixels a crop pixel
    crops = crop_rois(volume, spacing, ks, xs, ys, side_mm, size, offsets)
    height, width = volume.shape[1:]
    for crop, x, y, k in zip(crops, xs, ys, ks, strict=True):
        slices = torch.tensor(np.clip(k + np.array(offsets), 0, len(volume) - 1))
        theta = torch.tensor([[[side_mm / spacing[1] / width, 0.0, (2 * x + 1) / width - 1],
                               [0.0, side_mm / spacing[0] / height, (2 * y + 1) / height - 1]]])
        grid = F.affine_grid(theta, [1, len(offsets), size, size], align_corners=False)
        whole = F.grid_sample(volume[slices].float()[None], grid, padding_mode="zeros", align_corners=False)[0]
        torch.testing.assert_close(crop, whole, atol=1e-5, rtol=1e-5)
    assert crops[-1].abs().sum() == 0 and crops[0].abs().sum() > 0  # wholly outside: zeros


def test_crops_shrinking_a_fine_matrix_average_its_pixels():
    """A 60 mm crop of a 0.25 mm (1024 px) slice cut to 32 px averages 7 x 7 blocks: pixel noise
    falls as it does when a coarser matrix is read, stripes finer than a crop pixel vanish, a flat
    image stays flat to the crop's border, and a point stays at the centre."""
    from spinemm.data.roi import crop_rois

    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(3, 600, 600, generator=generator)
    crop = crop_rois(noise, (0.25, 0.25), [1], [300.0], [300.0], 60.0, 32)[0]
    assert crop.std() < 2.5 * noise.std() / 7  # bilinear reads alone keep about half the pixel noise
    stripes = (torch.arange(600) % 2).float().expand(3, 600, 600)
    assert crop_rois(stripes, (0.25, 0.25), [1], [300.3], [299.6], 60.0, 32)[0].std() < 0.05
    flat = crop_rois(torch.ones(3, 600, 600), (0.25, 0.25), [1], [300.0], [300.0], 60.0, 32)[0]
    torch.testing.assert_close(flat, torch.ones_like(flat))
    dot = torch.zeros(3, 600, 600)
    dot[1, 290:297, 310:317] = 1.0  # a 7 x 7 block centred on (x=313, y=293)
    crop = crop_rois(dot, (0.25, 0.25), [1], [313.0], [293.0], 60.0, 33)[0, 1]
    assert np.unravel_index(int(crop.argmax()), crop.shape) == (16, 16)


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


def test_grade_stage_survives_save_load_in_a_pipeline(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(TypeError):
        GraderConfig(side_millimetres=50)
    detect = spinemm.create_model("spine-tiny", num_slices=4).eval()
    stage = GradeStage(GraderConfig(backbone="cnn", size=16, channels=(8, 16)), query_dim=detect.config.fusion.dim).eval()
    with torch.no_grad():
        stage.grader.query_table.copy_(torch.randn_like(stage.grader.query_table))
    crops, targets = torch.rand(4, 3, 16, 16), torch.tensor([0, 5, 10, 24])
    out = stage(crops, targets)
    assert out["logits"].shape == (4, 3) and out["offset"].shape == (4, 3)
    SpinePipeline(detect, grade=stage).save_pretrained(tmp_path / "p")
    loaded = load_pipeline(tmp_path / "p")
    assert loaded.stage_names == ["detect", "grade"] and loaded.grade.config.channels == (8, 16)
    torch.testing.assert_close(loaded.grade.eval()(crops, targets)["logits"], out["logits"], rtol=0, atol=0)
    torch.testing.assert_close(loaded.grade.grader.query_table, stage.grader.query_table, rtol=0, atol=0)
    with pytest.raises(SpineModelError, match="crops must be"):
        stage(torch.rand(2, 5, 16, 16), targets[:2])
    # A pickle (or any other file) offered as a stage's weights is refused with the file named.
    (tmp_path / "p" / "grade.safetensors").write_bytes(b"\x80\x04 not safetensors")
    with pytest.raises(SpineModelError, match="grade.safetensors"):
        load_pipeline(tmp_path / "p")


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


def _stage_config(phantom_root, tmp_path, **sections):
    return {"init_from": str(tmp_path / "fusion"), "data": {"root": str(phantom_root)},
            "split": {"val_fraction": 0.25}, "train": {"cpu": True, "mixed_precision": "no"},
            "log": {"tensorboard": False, "progress": False},
            "pipeline": {"output_dir": str(tmp_path / "stages")},
            "locator": {"epochs": 1, "batch_size": 8, "model": {"size": 32, "channels": [8, 16, 16]}},
            "grader": {"epochs": 2, "batch_size": 16, "model": {"size": 16, "channels": [8, 16]}}, **sections}


def test_train_stages_then_staged_predict(phantom_root, tmp_path):
    torch.manual_seed(0)
    fusion = spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32})
    fusion.save_pretrained(tmp_path / "fusion")
    result = spinemm.training.train_stages(_stage_config(phantom_root, tmp_path))
    grade = result["stages"]["grade"]
    assert len(grade["history"]) == 2 and all(np.isfinite(h["train_loss"]) for h in grade["history"])
    metrics = grade["metrics"]
    for key in ("score", "before_score", "detect_score", "grader_score"):
        assert np.isfinite(metrics[key]), key
    assert metrics["train_rows"] > 0 and "study_context" in metrics  # on by default in the recipe
    # Every epoch was scored as the pipeline ships: its val score is the history's "score".
    assert all(np.isfinite(h["score"]) for h in grade["history"])
    pipeline = spinemm.load_pipeline(result["pipeline_dir"])
    assert pipeline.stage_names == ["detect", "locate", "grade"]
    context = pipeline.grade.study_context
    assert context.log_temperature.item() == pytest.approx(metrics["study_context"]["log_temperature"])
    # Only the later stages trained: the detect weights are those it was loaded from.
    for name, value in spinemm.load_model(tmp_path / "fusion").state_dict().items():
        torch.testing.assert_close(pipeline.detect.model.state_dict()[name], value, rtol=0, atol=0, msg=name)

    result = spinemm.predict(pipeline, phantom_root, split="test", progress=False)
    submission, locations = result
    assert len(submission) == len(locations) == 25 * 3
    np.testing.assert_allclose(submission[["normal_mild", "moderate", "severe"]].sum(axis=1), 1.0, atol=1e-6)
    # Every stage's output is in the result: the grades replace the detect stage's probabilities,
    # and the detect stage alone is read from the same run.
    detect = result.submission("detect")
    assert not np.allclose(submission.iloc[:, 1:].to_numpy(float), detect.iloc[:, 1:].to_numpy(float))
    alone = spinemm.predict(pipeline.detect.model, phantom_root, split="test", progress=False).submission()
    pd.testing.assert_frame_equal(alone, detect)
    assert result.graded is not None and result.located is not None and result.grade_probs.shape == (75, 3)
    for (study, series_id), rows in locations[locations.series_id >= 0].groupby(["study_id", "series_id"]):
        series = read_series(series_path(phantom_root, "test", study, series_id))
        assert set(rows.instance_number.astype(int)) <= set(series.instance_to_index)


def test_train_stages_needs_a_detect_model(phantom_root, tmp_path):
    with pytest.raises(SpineModelError, match="init_from"):
        spinemm.training.train_stages({"data": {"root": str(phantom_root)}})
    with pytest.raises(SpineModelError, match="pipeline.stages"):
        spinemm.training.train_stages(_stage_config(phantom_root, tmp_path, pipeline={"stages": ["grade", "polish"]}))


def test_val_solution_matches_the_frame(phantom_root):
    from spinemm.training.grade import val_solution

    frame = load_tables(phantom_root, "train")
    studies = sorted(frame.study_id.unique())[:2]
    solution = val_solution(frame, studies)
    labelled = frame[frame.study_id.isin(studies) & (frame.label >= 0)]
    assert len(solution) == len(labelled)
    one_hot = solution.set_index("row_id")[["normal_mild", "moderate", "severe"]].to_numpy().argmax(1)
    expected = pd.Series(labelled.label.to_numpy(), index=[f"{s}_{c}" for s, c in zip(labelled.study_id, labelled.column, strict=True)])
    np.testing.assert_array_equal(one_hot, expected.loc[solution.row_id].to_numpy())
