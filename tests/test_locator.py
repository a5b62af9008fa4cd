"""The locate stage: heatmap decoding, the net, its data, its training through the engine, and its run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import spinemm
from spinemm.constants import LEVELS, PLANES
from spinemm.data import load_tables, read_series, series_path
from spinemm.data.level_slices import (
    SAGITTAL_CONDITIONS,
    LevelSlices,
    foramen_offsets_mm,
    locator_input,
    square_frame,
)
from spinemm.data.store import SeriesStore
from spinemm.errors import SpineModelError
from spinemm.models.config import LocatorConfig
from spinemm.models.heads import decode_location
from spinemm.models.locator import LOCATOR_PLANES
from spinemm.pipeline import Findings, LocateStage, SpinePipeline, axial_slices_from_canal, load_pipeline
from spinemm.training.config import load_config
from spinemm.training.locate import augment, evaluate_locator, train_locate

T1, T2 = PLANES.index("Sagittal T1"), PLANES.index("Sagittal T2/STIR")


def test_decode_with_radius_picks_one_mode_not_the_midpoint():
    logits = torch.full((1, 1, 1, 8, 8), -30.0)
    logits[0, 0, 0, 2, 4] = 0.0  # two equal-ish peaks two rows apart: rows 2 and 4, column 4
    logits[0, 0, 0, 4, 4] = -0.1
    (_, x, y), = decode_location(logits)[0][0]
    assert y == pytest.approx((3 + 0.5) / 8, abs=0.02)  # the global soft-argmax lands between them
    location, confidence = decode_location(logits, radius=1)
    assert location[0, 0, 2] == pytest.approx((2 + 0.5) / 8, abs=1e-4)  # the local one on the higher peak
    assert location[0, 0, 1] == pytest.approx((4 + 0.5) / 8, abs=1e-4)
    assert confidence[0, 0] == pytest.approx(1 / (1 + np.exp(-0.1)), abs=1e-3)  # mass of that square


def test_locate_stage_survives_save_load_in_a_pipeline(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(TypeError):
        LocatorConfig(pixels=64)
    stage = LocateStage(LocatorConfig(size=32, channels=(8, 16, 16))).eval()
    slices, planes = torch.rand(3, 3, 32, 32), torch.tensor([T1, T2, T1])
    heatmaps = stage(slices, planes)
    assert heatmaps.shape == (3, len(LEVELS), 8, 8)
    # The plane picks its own maps: the same slice read as T1 and as T2 differs.
    assert not torch.allclose(heatmaps[0], stage(slices[:1], torch.tensor([T2]))[0])
    detect = spinemm.create_model("spine-tiny", num_slices=4)
    SpinePipeline(detect, locate=stage).save_pretrained(tmp_path / "p")
    loaded = load_pipeline(tmp_path / "p")
    assert loaded.stage_names == ["detect", "locate"] and loaded.locate.config.channels == (8, 16, 16)
    torch.testing.assert_close(loaded.locate.eval()(slices, planes), heatmaps, rtol=0, atol=0)
    with pytest.raises(SpineModelError, match="locator slices must be"):
        stage(torch.rand(2, 3, 48, 48), planes[:2])
    with pytest.raises(SpineModelError, match="sagittal planes"):
        stage(slices[:1], torch.tensor([PLANES.index("Axial T2")]))
    with pytest.raises(SpineModelError, match="multiple of 4"):
        LocateStage(LocatorConfig(size=30))


def test_locator_input_keeps_proportions_in_its_square_frame():
    """A non-square slice is centred in a square (zeros beside it), not stretched: a point keeps
    its place in the square's coordinates, which the pipeline maps back to the slice's pixels."""
    volume = torch.zeros(3, 60, 40)
    volume[1] = 0.1  # the slice's extent
    volume[1, 45, 10] = 1.0
    image = locator_input(volume, 1, context=1, size=20)
    assert image.shape == (3, 20, 20) and image[0].sum() == 0 and image[2].sum() == 0
    side, top, left = square_frame(60, 40)
    assert (side, top, left) == (60, 0, 10)
    row, col = np.unravel_index(int(image[1].argmax()), (20, 20))
    assert (row + 0.5) / 20 == pytest.approx((45 + top + 0.5) / side, abs=1 / 20)
    assert (col + 0.5) / 20 == pytest.approx((10 + left + 0.5) / side, abs=1 / 20)
    # the 40 px wide slice fills the middle 2/3 of the square: a 10 px band of zeros each side
    assert image[1, :, :3].abs().max() == 0 and image[1, :, -3:].abs().max() == 0
    assert image[1, :, 4:-4].min() > 0.05
    square = torch.rand(3, 40, 40)
    torch.testing.assert_close(locator_input(square, 1, 1, 20),
                               F.interpolate(square[None], size=(20, 20), mode="bilinear", antialias=True)[0])


def test_level_slices_hold_every_labelled_sagittal_point(phantom_root):
    frame = load_tables(phantom_root, "train")
    studies = sorted(frame.study_id.unique())[:2]
    data = LevelSlices(phantom_root, frame, studies, size=32, progress=False)
    rows = frame[frame.study_id.isin(studies) & frame.condition.isin(SAGITTAL_CONDITIONS) & frame.instance_number.notna()]
    assert len(data) == rows.groupby(["study_id", "condition", "instance_number"]).ngroups
    assert int(data.mask.sum()) == len(rows)
    assert set(data.planes.tolist()) <= set(LOCATOR_PLANES) and data.slices.shape[1:] == (3, 32, 32)
    # Points are the label coordinates over the image size.
    row = rows.iloc[0]
    shape = read_series(series_path(phantom_root, "train", row.study_id, row.series_id)).volume.shape[-2:]
    expected = (row.x / shape[1], row.y / shape[0])
    assert any(np.allclose(p, expected, atol=1e-6) for p in data.points[data.mask].numpy())


def test_augment_moves_points_with_the_image():
    slices = torch.zeros(2, 1, 40, 40)
    slices[0, 0, 10, 20] = slices[1, 0, 30, 5] = 1.0
    points = torch.tensor([[[20.5 / 40, 10.5 / 40]] * 5, [[5.5 / 40, 30.5 / 40]] * 5])
    mask = torch.ones(2, 5, dtype=torch.bool)
    moved, new_points, new_mask = augment(slices, points, mask, shift=0.2, generator=torch.Generator().manual_seed(1))
    for i in range(2):
        if new_mask[i, 0]:
            row, col = np.unravel_index(int(moved[i, 0].argmax()), (40, 40))
            assert (col + 0.5) / 40 == pytest.approx(float(new_points[i, 0, 0]), abs=1.5 / 40)
            assert (row + 0.5) / 40 == pytest.approx(float(new_points[i, 0, 1]), abs=1.5 / 40)
        else:  # pushed out of view
            assert not ((new_points[i, 0] >= 0) & (new_points[i, 0] < 1)).all()


def _findings(frame, x=None, y=None):
    """Findings at the label points of ``frame``'s labelled rows (optionally every point moved)."""
    truth = frame[frame.instance_number.notna()]
    locations = truth[["study_id", "condition", "level", "series_id", "instance_number", "x", "y"]].assign(confidence=0.5)
    if x is not None:
        locations = locations.assign(x=x, y=y)
    return truth, Findings.from_frame(locations)


@pytest.fixture(scope="module")
def trained_locator(phantom_root, tmp_path_factory):
    """A locate stage that has learned the phantom's training slices (memorised), trained by the engine."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("locate")
    config = load_config({"data": {"root": str(phantom_root)}, "train": {"cpu": True, "mixed_precision": "no"},
                          "log": {"tensorboard": False, "progress": False},
                          "locator": {"epochs": 40, "batch_size": 8, "shift": 0.0,
                                      "model": {"size": 48, "channels": [16, 32, 32]}}})
    frame = load_tables(phantom_root, "train")
    studies = sorted(frame.study_id.unique().tolist())
    run = SimpleNamespace(root=phantom_root, frame=frame, train_ids=studies, val_ids=studies,
                          store=SeriesStore(phantom_root, "train"))
    result = train_locate(config, run, out, progress=False)
    return result["stage"].eval(), frame, result, run


def test_train_locate_learns_the_level_points(trained_locator, phantom_root):
    stage, frame, result, run = trained_locator
    history = result["history"]
    assert len(history) == 40 and history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert result["metrics"]["val_within_5mm"] > 0.8, result["metrics"]  # on the slices it trained on
    assert len(result["metrics"]["subarticular_mm"]) == 30 and stage.config.subarticular_mm is not None
    untrained = LocateStage(LocatorConfig(size=48, channels=(16, 32, 32)))
    data = LevelSlices(phantom_root, frame, sorted(frame.study_id.unique()), size=48, progress=False, store=run.store)
    assert evaluate_locator(untrained, data)["val_within_5mm"] < 0.3


def test_locate_stage_moves_sagittal_findings_to_the_labels(trained_locator):
    stage, frame, _, run = trained_locator
    truth, findings = _findings(frame, x=32.0, y=32.0)  # the labelled slices, every point at the centre
    located = stage.locate(findings, run.store)
    assert len(located) == len(findings)
    np.testing.assert_array_equal(findings.x, 32.0)  # a new record: the input is untouched
    sagittal = truth.condition.isin(SAGITTAL_CONDITIONS).to_numpy()
    error = np.hypot(located.x - truth.x.to_numpy(), located.y - truth.y.to_numpy())[sagittal]  # pixels of 64
    assert (error < 2).mean() > 0.8
    assert (located.confidence[sagittal] != 0.5).all()
    # the locator reads several studies' slices in one batch: the same points as a study at a time
    one_by_one = stage.locate(findings, run.store, studies_per_batch=1)
    np.testing.assert_allclose(np.stack([one_by_one.x, one_by_one.y, one_by_one.confidence]),
                               np.stack([located.x, located.y, located.confidence]), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(one_by_one.instance_number, located.instance_number)


def test_axial_slices_follow_the_canal_point(phantom_root):
    frame = load_tables(phantom_root, "train")
    truth, findings = _findings(frame)
    axial = truth.condition.str.contains("subarticular").to_numpy()
    wrong = findings.replace(axial, instance_number=1)  # every axial row on the first slice
    moved = axial_slices_from_canal(wrong, SeriesStore(phantom_root, "train"))
    off = np.abs(moved.instance_number[axial] - truth.instance_number[axial].astype(int).to_numpy())
    assert (off <= 1).mean() > 0.9 and (off == 0).mean() > 0.6
    pd.testing.assert_frame_equal(moved.to_frame()[~axial], wrong.to_frame()[~axial])  # sagittal rows untouched


def test_subarticular_offsets_are_measured_from_the_labels(phantom_root):
    from spinemm.data.anatomy import label_patient_points, subarticular_offset, subarticular_offsets_mm

    frame = load_tables(phantom_root, "train")
    points = label_patient_points(SeriesStore(phantom_root, "train"), frame, sorted(frame.study_id.unique()))
    assert len(points) == int((frame.instance_number.notna() & frame.condition.isin(
        ["spinal_canal_stenosis", "left_subarticular_stenosis", "right_subarticular_stenosis"])).sum())
    offsets = subarticular_offsets_mm(points)
    assert len(offsets) == 30
    for level in range(len(LEVELS)):  # the phantom's zones: 7-7.5 mm to their side, 2.7 mm anterior
        left = subarticular_offset(offsets, "left_subarticular_stenosis", level)
        right = subarticular_offset(offsets, "right_subarticular_stenosis", level)
        assert 5 < left[0] < 10 and -10 < right[0] < -5, (left, right)
        assert -4 < left[1] < -1.5 and -4 < right[1] < -1.5 and abs(left[2]) < 2
    assert subarticular_offsets_mm(points[points.condition != "right_subarticular_stenosis"]) is None
    assert LocatorConfig(subarticular_mm=list(offsets)).subarticular_mm == offsets
    for bad in ([1.0] * 29, [float("nan")] * 30):
        with pytest.raises(SpineModelError, match="subarticular_mm"):
            LocatorConfig(subarticular_mm=bad)


def test_subarticular_findings_go_to_their_zone_beside_the_canal_point(phantom_root):
    """From the canal labels and the measured offsets, the stage puts the subarticular findings,
    whose first-stage points are all at the image centre on slice 1, near their labels."""
    from spinemm.data.anatomy import label_patient_points, subarticular_offsets_mm

    frame = load_tables(phantom_root, "train")
    store = SeriesStore(phantom_root, "train")
    offsets = subarticular_offsets_mm(label_patient_points(store, frame, sorted(frame.study_id.unique())))
    truth, findings = _findings(frame)
    axial = truth.condition.str.contains("subarticular").to_numpy()
    wrong = findings.replace(axial, instance_number=1, x=32.0, y=32.0)
    from spinemm.pipeline.locate import _axial_from_canal

    for with_offsets in (None, offsets):
        moved = wrong.replace()
        for study_id, rows in moved.by_study(moved.located):
            _axial_from_canal(moved, rows, store, study_id, with_offsets)
        off = np.abs(moved.instance_number[axial] - truth.instance_number[axial].astype(int).to_numpy())
        assert (off <= 1).mean() > 0.9  # the slice through the canal point either way
        error = np.hypot(moved.x[axial] - truth.x[axial].to_numpy(), moved.y[axial] - truth.y[axial].to_numpy())
        if with_offsets is None:
            np.testing.assert_array_equal(moved.x[axial], 32.0)  # no offsets: the first stage's point stays
        else:
            assert np.median(error) < 3 and (error < 6).mean() > 0.9, np.percentile(error, [50, 90])  # pixels
        pd.testing.assert_frame_equal(moved.to_frame()[~axial], wrong.to_frame()[~axial])  # sagittal rows untouched


def test_height_prior_centres_each_level_on_its_canal_point(phantom_root):
    from spinemm.pipeline.locate import _height_prior

    frame = load_tables(phantom_root, "train")
    truth, findings = _findings(frame)
    study = int(truth.study_id.iloc[0])
    in_study = (truth.study_id == study).to_numpy()
    canal = np.flatnonzero(in_study & (truth.condition == "spinal_canal_stenosis").to_numpy())
    foramen = truth[in_study & (truth.condition == "left_neural_foraminal_narrowing").to_numpy()]
    store = SeriesStore(phantom_root, "train")
    t1 = store.get(study, foramen.series_id.iloc[0])
    grid, height = 16, t1.volume.shape[-2]
    prior = _height_prior(findings, canal, store, study, t1, grid, sd_mm=12.0)
    assert prior.shape == (len(LEVELS), grid, grid)
    assert torch.equal(prior[..., 0], prior[..., -1])  # a height prior: the same along each row
    peak_rows = (prior[..., 0].argmax(-1).float() + 0.5) / grid * height  # pixels of the T1 slice
    anchored = set(truth.level.to_numpy()[canal])
    for row in foramen[foramen.level.isin(anchored)].itertuples():
        # the foramen sits beside its disc: within one cell (4 px, ~19 mm here) of its canal's height
        assert abs(float(peak_rows[LEVELS.index(row.level)]) - row.y) < height / grid, row.level
    for level in set(LEVELS) - anchored:  # no canal point: no prior
        assert torch.equal(prior[LEVELS.index(level)], torch.zeros(grid, grid))


def test_foramen_offsets_are_measured_from_the_labels(phantom_root):
    frame = load_tables(phantom_root, "train")
    data = LevelSlices(phantom_root, frame, sorted(frame.study_id.unique()), size=32, progress=False)
    assert len(data.patient_x) == int(data.mask.sum())  # one patient x per labelled sagittal point
    offsets = foramen_offsets_mm(data.patient_x)
    assert len(offsets) == len(LEVELS)
    # the phantom's foramina lie half the canal's width plus 5 mm (x its scale, 0.9-1.1) from the midline
    assert all(12 < v < 25 for v in offsets), offsets
    assert foramen_offsets_mm(data.patient_x[data.patient_x.condition == "spinal_canal_stenosis"]) is None
    # the stage's config carries them, and refuses what is not 5 distances
    assert LocatorConfig(foramen_mm=list(offsets)).foramen_mm == offsets
    with pytest.raises(SpineModelError, match="foramen_mm"):
        LocatorConfig(foramen_mm=[17.0] * 4)


def test_foramina_move_to_their_own_side_of_the_midline(phantom_root):
    from spinemm.pipeline.locate import _foramina_beside_the_midline

    frame = load_tables(phantom_root, "train")
    truth, findings = _findings(frame)
    data = LevelSlices(phantom_root, frame, sorted(frame.study_id.unique()), size=32, progress=False)
    offsets = np.asarray(foramen_offsets_mm(data.patient_x))
    foramen = truth.condition.str.contains("neural_foraminal").to_numpy()
    left = truth.condition.str.startswith("left_neural").to_numpy()
    # every foramen put on its partner's slice (both on one side, as a first stage may do)
    swapped = findings.replace()
    for study in truth.study_id.unique():
        in_study = (truth.study_id == study).to_numpy()
        for level in LEVELS:
            at = in_study & (truth.level == level).to_numpy()
            rows_l, rows_r = np.flatnonzero(at & left), np.flatnonzero(at & foramen & ~left)
            if len(rows_l) and len(rows_r):
                swapped.instance_number[rows_r] = swapped.instance_number[rows_l]
    store = SeriesStore(phantom_root, "train")
    moved = swapped.replace()
    for study, rows in moved.by_study():
        _foramina_beside_the_midline(moved, rows, store, study, offsets)
    true_slice = truth.instance_number.astype(int).to_numpy()
    assert (swapped.instance_number[foramen] == true_slice[foramen]).mean() < 0.7
    # instances run across the stack; the grade stage's offset head moves a crop a slice either way
    off = np.abs(moved.instance_number[foramen] - true_slice[foramen])
    assert (off <= 1).all() and (off == 0).mean() > 0.6, off
    untouched = ~foramen
    np.testing.assert_array_equal(moved.instance_number[untouched], swapped.instance_number[untouched])
    np.testing.assert_array_equal(moved.x, swapped.x)  # the in-plane point stays


def test_locate_stage_leaves_an_unreadable_series_as_it_was(trained_locator):
    stage, frame, _, run = trained_locator
    truth, findings = _findings(frame)
    study = int(truth.study_id.iloc[0])
    broken = ((truth.study_id == study) & (truth.condition == "spinal_canal_stenosis")).to_numpy()
    findings = findings.replace(broken, series_id=999_999_999)  # no such folder
    with pytest.warns(UserWarning, match=f"study {study} series 999999999: not located"):
        located = stage.locate(findings, run.store)
    pd.testing.assert_frame_equal(located.to_frame()[broken], findings.to_frame()[broken])
    assert len(located) == len(findings)  # nothing dropped
    # Without a canal point its axial rows keep their slices.
    axial = ((truth.study_id == study) & truth.condition.str.contains("subarticular")).to_numpy()
    np.testing.assert_array_equal(located.instance_number[axial], findings.instance_number[axial])
