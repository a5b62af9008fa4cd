"""Preprocessing, augmentation and SpineDataset samples: shapes, labels, and targets on the anatomy."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
import torch.nn.functional as F

from spinemm.constants import LABEL_COLUMNS, NUM_TARGETS, PLANES, TARGET_PLANE_INDEX
from spinemm.data import dicom
from spinemm.data.dataset import SpineDataset, collate, kfold_split, study_split
from spinemm.data.tables import load_tables, series_path
from spinemm.data.transforms import (
    AugmentConfig,
    affine,
    augment_plane,
    channel_indices,
    choose_slices,
    nearest_slice,
    preprocess_series,
    shift_stack,
    slice_position,
    source_slice,
)
from spinemm.errors import SpineDataError
from spinemm.text import QUERY_TEXTS

SMALL = {"num_slices": 6, "image_size": 32}


@dataclass
class FakeSeries:
    """The attributes preprocess_series reads from a dicom.Series."""

    volume: np.ndarray
    instance_numbers: np.ndarray
    pixel_spacing: tuple[float, float] = (0.7, 0.8)
    slice_spacing: float = 4.0


def ramp_series(num: int = 11, shape: tuple[int, int] = (16, 16), scale: float = 1.0) -> FakeSeries:
    """Slice i is constant ``i * scale`` in physical units; instance numbers start at 101."""
    volume = np.broadcast_to(np.arange(num, dtype=np.float32)[:, None, None] * scale, (num, *shape)).copy()
    return FakeSeries(volume, np.arange(101, 101 + num, dtype=np.int64))


# --- transforms ------------------------------------------------------------------------------------


def test_choose_slices_spreads_evenly_and_repeats_short_series():
    np.testing.assert_array_equal(choose_slices(3, 6), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(choose_slices(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(choose_slices(5, 5), np.arange(5))
    np.testing.assert_array_equal(choose_slices(7, 1), [0])
    wide = choose_slices(40, 16)
    assert wide[0] == 0 and wide[-1] == 39 and np.all(np.diff(wide) >= 2) and np.all(np.diff(wide) <= 3)
    with pytest.raises(ValueError):
        choose_slices(0, 4)


def test_channel_indices_use_original_neighbours_clamped():
    np.testing.assert_array_equal(
        channel_indices(np.array([0, 4, 9]), 10, "2.5d"), [[0, 0, 1], [3, 4, 5], [8, 9, 9]]
    )
    np.testing.assert_array_equal(channel_indices(np.array([2]), 10, "single"), [[2, 2, 2]])
    with pytest.raises(ValueError, match="channels"):
        channel_indices(np.array([0]), 3, "rgb")


def test_preprocess_normalises_per_series_and_builds_25d_channels():
    out = preprocess_series(ramp_series(scale=37.0), num_slices=6, image_size=8, channels="2.5d")
    assert out.image.shape == (6, 3, 8, 8) and out.image.dtype == torch.float16
    np.testing.assert_array_equal(out.indices, [0, 2, 4, 6, 8, 10])
    np.testing.assert_array_equal(out.instance_numbers, out.indices + 101)
    # percentiles 0.5 / 99.5 of the values 0..10 (x37) are ~0 and ~10 (x37): slice i -> ~i / 10
    expected = np.clip(channel_indices(out.indices, 11, "2.5d") / 10.0, 0, 1)  # [S, 3]
    got = out.image.float().mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(got, expected, atol=0.01)
    assert float(out.image.min()) == 0.0 and float(out.image.max()) == 1.0
    assert torch.equal(out.image[:, :, 0, 0], out.image[:, :, -1, -1])  # constant slices stay constant
    # scale invariance: normalisation happens after the physical intensities
    assert torch.equal(preprocess_series(ramp_series(scale=1.0), 6, 8).image, out.image)
    single = preprocess_series(ramp_series(scale=37.0), 6, 8, "single").image
    assert torch.equal(single[:, 0], single[:, 2]) and torch.equal(single[:, 1], out.image[:, 1])


def test_preprocess_resizes_with_antialiasing_and_keeps_geometry():
    rng = np.random.default_rng(0)
    series = FakeSeries(rng.normal(500, 100, (4, 40, 60)).astype(np.float32), np.array([7, 5, 9, 3]))
    out = preprocess_series(series, num_slices=2, image_size=20, channels="single")
    assert out.original_shape == (40, 60) and out.pixel_spacing == (0.7, 0.8) and out.slice_spacing == 4.0
    np.testing.assert_array_equal(out.instance_numbers, [7, 3])
    assert out.index_of_instance(9) == 2 and out.index_of_instance(4) is None
    # antialiasing averages noise away: downsampled pixels vary far less than the originals
    lo, hi = np.percentile(series.volume, (0.5, 99.5))
    original_std = float(np.clip((series.volume - lo) / (hi - lo), 0, 1).std())
    assert float(out.image.float().std()) < 0.6 * original_std
    const = preprocess_series(FakeSeries(np.full((3, 8, 8), 5.0, np.float32), np.arange(3)), 3, 8)
    assert float(const.image.abs().max()) == 0.0  # a constant series cannot be normalised: zeros


def test_slice_position_reaches_every_source_slice():
    """A stack of 8 from 15 slices shows 0, 2, ..., 14: the midline (7) is never shown. Its target
    position is 3.5, and a decoded 3.5 maps back to it; shown slices keep their own positions."""
    indices = choose_slices(15, 8)
    assert 7 not in indices and nearest_slice(indices, 7, 15) == 3  # rounded: the slice beside it
    assert slice_position(indices, 7, 15) == 3.5 and slice_position(indices, 8, 15) == 4.0
    for source in range(15):
        assert source_slice(indices, slice_position(indices, source, 15)) == source
    assert slice_position(indices, 13, 15) == pytest.approx(6.5)
    shifted = np.array([0, 0, 0, 2, 4, 6, 8, 10])  # a shifted stack repeats its edge slice
    assert slice_position(shifted, 0, 15) == 0.0 and slice_position(shifted, 1, 15) == 2.5
    assert slice_position(shifted, 14, 15) is None  # moved out of the stack
    # the first stage's answer between two shown slices names the slice between them
    from spinemm.pipeline.detect import findings_from_outputs

    meta = {"study_id": 1, "series_ids": [10, 11, 12], "original_shape": [(64, 64)] * 3,
            "slice_indices": [indices] * 3, "source_instance_numbers": [np.arange(101, 116)] * 3}
    location = np.zeros((1, 25, 3))
    location[0, :, 0], location[0, :, 1:] = 3.5, 0.5
    found = findings_from_outputs(location, np.ones((1, 25)), [meta])
    assert (found.instance_number == 108).all()  # source 7


def test_nearest_slice_and_tolerance():
    indices = choose_slices(30, 6)  # [0, 6, 12, 17, 23, 29]
    assert nearest_slice(indices, 12, 30) == 2 and nearest_slice(indices, 14, 30) == 2
    assert nearest_slice(indices, 3, 30) == 0  # a tie goes to the first slice
    shifted = indices[[1, 2, 3, 4, 5, 5]]
    assert nearest_slice(shifted, 0, 30) is None  # moved out of the stack by a slice shift
    assert nearest_slice(choose_slices(3, 6), 1, 3) == 2
    assert nearest_slice(np.array([1, 2, 3, 3]), 0, 4) is None  # S >= N: must match exactly


def blob(size: int, x: float, y: float, sigma: float = 1.5) -> torch.Tensor:
    """[size, size] Gaussian centred at normalised (x, y) (continuous pixel coordinate = x * size)."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    return torch.exp(-((gx - x * size) ** 2 + (gy - y * size) ** 2) / (2 * sigma**2))


def peak(image: torch.Tensor) -> tuple[float, float]:
    """Intensity-weighted centre of a [H, W] image, normalised like the targets."""
    h, w = image.shape
    coords_y, coords_x = torch.arange(h) + 0.5, torch.arange(w) + 0.5
    total = image.sum()
    return float((image.sum(0) * coords_x).sum() / total / w), float(
        (image.sum(1) * coords_y).sum() / total / h
    )


@pytest.mark.parametrize(("scale", "shift"), [(1.0, (0.0, 0.0)), (1.1, (0.06, -0.05)), (0.9, (-0.07, 0.03))])
def test_affine_moves_targets_with_the_pixels(scale, shift):
    size = 64
    points = torch.tensor([[0.30, 0.60], [0.70, 0.25]])
    image = torch.stack([blob(size, *points[0]), blob(size, *points[1])])[:, None]  # [2, 1, H, W]
    image = image.expand(2, 3, size, size)
    out, moved, valid = affine(image, points, torch.tensor([True, True]), scale, shift)
    assert valid.all() and out.shape == image.shape
    for k in range(2):
        px, py = peak(out[k, 1])
        assert abs(px - float(moved[k, 0])) * size < 0.2 and abs(py - float(moved[k, 1])) * size < 0.2
    if scale == 1.0:
        assert torch.allclose(out, image, atol=1e-5) and torch.allclose(moved, points)


def test_affine_samples_every_slice_as_a_grid_per_slice_would():
    import torch.nn.functional as F

    image = torch.rand(5, 3, 24, 20)
    scale, shift = 1.07, (0.05, -0.03)
    out, _, _ = affine(image, torch.zeros(0, 2), torch.zeros(0, dtype=torch.bool), scale, shift)
    dx, dy = 2.0 * shift[0], 2.0 * shift[1]
    theta = torch.tensor([[1 / scale, 0.0, -dx / scale], [0.0, 1 / scale, -dy / scale]])
    grid = F.affine_grid(theta.expand(5, 2, 3), [5, 3, 24, 20], align_corners=False)
    expected = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert torch.equal(out, expected)


def test_affine_drops_targets_that_leave_the_image():
    image = torch.rand(2, 3, 16, 16)
    points = torch.tensor([[0.95, 0.5], [0.5, 0.5], [0.2, 0.2]])
    _, moved, valid = affine(image, points, torch.tensor([True, True, False]), 1.0, (0.1, 0.0))
    assert valid.tolist() == [False, True, False]
    assert torch.equal(moved[0], torch.zeros(2)) and moved[1].tolist() == pytest.approx([0.6, 0.5])


def test_shift_stack_moves_pixels_and_indices_together():
    image = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    indices, instances = np.array([0, 2, 4, 6, 8]), np.array([10, 12, 14, 16, 18])
    out, new_idx, new_inst = shift_stack(image, indices, instances, 1)
    assert out[:, 0, 0, 0].tolist() == [1, 2, 3, 4, 4]
    np.testing.assert_array_equal(new_idx, [2, 4, 6, 8, 8])
    np.testing.assert_array_equal(new_inst, [12, 14, 16, 18, 18])
    assert nearest_slice(new_idx, 4, 9) == 1 and nearest_slice(new_idx, 0, 9) is None


def test_augment_plane_is_deterministic_given_a_generator():
    image = torch.rand(6, 3, 16, 16)
    args = (np.arange(6), np.arange(6) + 50, torch.tensor([[0.4, 0.5]]), torch.tensor([True]))

    def run(seed):
        return augment_plane(image, *args, torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3]) and np.array_equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].dtype == torch.float32 and 0.0 <= float(a[0].min()) and float(a[0].max()) <= 1.0


# --- SpineDataset ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_frame(phantom_root):
    return load_tables(phantom_root, "train")


def test_sample_keys_shapes_and_dtypes(phantom_root, train_frame):
    data = SpineDataset(phantom_root, frame=train_frame, **SMALL)
    assert len(data) == 8 and data.study_ids == sorted(train_frame["study_id"].unique().tolist())
    sample = data[0]
    assert set(sample) == {"image", "plane_mask", "text", "label", "location", "location_mask", "meta"}
    assert sample["image"].shape == (3, 6, 3, 32, 32) and sample["image"].dtype == torch.float32
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert sample["plane_mask"].dtype == torch.bool and sample["plane_mask"].shape == (3,)
    assert sample["label"].dtype == torch.int64 and sample["label"].shape == (NUM_TARGETS,)
    assert sample["location"].dtype == torch.float32 and sample["location"].shape == (NUM_TARGETS, 3)
    assert sample["location_mask"].dtype == torch.bool and sample["location_mask"].shape == (NUM_TARGETS,)
    assert sample["text"] == list(QUERY_TEXTS)
    meta = sample["meta"]
    assert meta["study_id"] == data.study_ids[0] and len(meta["series_ids"]) == 3
    for p in range(3):
        if sample["plane_mask"][p]:
            assert meta["instance_numbers"][p].dtype == np.int64 and meta["instance_numbers"][p].shape == (6,)
            assert meta["original_shape"][p] == (64, 64)
    loc = sample["location"][sample["location_mask"]]
    assert (
        loc.numel()
        and (loc[:, 0] >= 0).all()
        and (loc[:, 0] < 6).all()
        and ((loc[:, 1:] >= 0) & (loc[:, 1:] <= 1)).all()
    )
    assert torch.equal(
        sample["location"][~sample["location_mask"]], torch.zeros(int((~sample["location_mask"]).sum()), 3)
    )
    assert "split='train'" in repr(data) and "studies=8" in repr(data)


def test_labels_and_series_follow_the_tables(phantom_root, train_frame):
    data = SpineDataset(phantom_root, frame=train_frame, **SMALL)
    for i, study in enumerate(data.study_ids):
        rows = train_frame[train_frame["study_id"] == study].sort_values("target")
        sample = data[i]
        np.testing.assert_array_equal(sample["label"].numpy(), rows["label"].to_numpy())
        for p, plane in enumerate(PLANES):
            plane_rows = rows[rows["plane"] == plane]
            candidates = plane_rows["candidate_series"].iloc[0]
            assert bool(sample["plane_mask"][p]) == bool(candidates)
            chosen = sample["meta"]["series_ids"][p]
            labelled = plane_rows.loc[plane_rows["instance_number"].notna(), "series_id"]
            expected = labelled.mode().min() if len(labelled) else (min(candidates) if candidates else -1)
            assert chosen == expected
        # every coordinate on a chosen series becomes a target, and only those
        on_chosen = rows["instance_number"].notna().to_numpy() & (
            rows["series_id"].to_numpy()
            == np.array([sample["meta"]["series_ids"][p] for p in TARGET_PLANE_INDEX])
        )
        np.testing.assert_array_equal(sample["location_mask"].numpy(), on_chosen)


def test_location_targets_point_at_the_labelled_slice_and_pixels(phantom_root, train_frame):
    num_slices = 40  # at least every phantom series' slice count, so the labelled slice is shown
    data = SpineDataset(
        phantom_root,
        frame=train_frame,
        num_slices=num_slices,
        image_size=64,
        study_ids=[train_frame["study_id"].iloc[0]],
    )
    sample = data[0]
    rows = train_frame[train_frame["study_id"] == data.study_ids[0]].sort_values("target")
    checked = 0
    for t in np.flatnonzero(sample["location_mask"].numpy()):
        row, p = rows.iloc[t], TARGET_PLANE_INDEX[t]
        s, x, y = sample["location"][t].tolist()
        assert sample["meta"]["instance_numbers"][p][int(s)] == int(row["instance_number"])
        height, width = sample["meta"]["original_shape"][p]
        assert x * width == pytest.approx(row["x"], abs=1e-3) and y * height == pytest.approx(
            row["y"], abs=1e-3
        )
        # with image_size == original size the pixels are the normalised DICOM pixels of that instance
        series = dicom.read_series(
            series_path(phantom_root, "train", data.study_ids[0], int(row["series_id"]))
        )
        lo, hi = np.percentile(series.volume, (0.5, 99.5))
        original = np.clip(
            (series.volume[series.instance_to_index[int(row["instance_number"])]] - lo) / (hi - lo), 0, 1
        )
        shown = sample["image"][p, int(s), 1].numpy()
        np.testing.assert_allclose(shown, original, atol=2e-3)
        checked += 1
    assert checked >= 10


def patch_values(image: torch.Tensor, x: float, y: float, radius: float) -> torch.Tensor:
    """Bilinear samples of [H, W] on a 9x9 grid of +-radius (normalised) around (x, y)."""
    offsets = torch.linspace(-radius, radius, 9)
    gy, gx = torch.meshgrid(y + offsets, x + offsets, indexing="ij")
    grid = torch.stack([gx * 2 - 1, gy * 2 - 1], dim=-1)[None]
    return F.grid_sample(image[None, None], grid, align_corners=False)[0, 0].flatten()


def test_augmentation_keeps_targets_on_the_same_anatomy(phantom_root, train_frame):
    geometric = AugmentConfig(gain=(1.0, 1.0), gamma=(1.0, 1.0), noise_std=0.0)
    kwargs = {
        "frame": train_frame,
        "num_slices": 40,
        "image_size": 64,
        "study_ids": train_frame["study_id"].unique()[:3],
    }
    plain = SpineDataset(phantom_root, **kwargs)
    augmented = SpineDataset(phantom_root, augment=geometric, seed=3, **kwargs)
    same, control, moved = [], [], 0
    for i in range(len(plain)):
        a, b = plain[i], augmented[i]
        for t in np.flatnonzero((a["location_mask"] & b["location_mask"]).numpy()):
            p = TARGET_PLANE_INDEX[t]
            (sa, xa, ya), (sb, xb, yb) = a["location"][t].tolist(), b["location"][t].tolist()
            # the slice shown at the target is the labelled instance in both
            assert a["meta"]["instance_numbers"][p][int(sa)] == b["meta"]["instance_numbers"][p][int(sb)]
            moved += (abs(xa - xb) + abs(ya - yb)) > 0.01
            # zoom is within 10%: over a +-3 px patch that moves samples by < 0.3 px
            ref = patch_values(a["image"][p, int(sa), 1], xa, ya, 0.05)
            got = patch_values(b["image"][p, int(sb), 1], xb, yb, 0.05)
            off = patch_values(b["image"][p, int(sb), 1], xb + 0.15, yb - 0.15, 0.05)
            same.append(float(torch.corrcoef(torch.stack([ref, got]))[0, 1]))
            control.append(float(torch.corrcoef(torch.stack([ref, off]))[0, 1]))
    assert len(same) >= 10 and moved >= len(same) // 2
    assert np.median(same) > 0.9 and np.median(same) > np.nanmedian(control) + 0.3


def test_augmentation_is_seeded_and_changes_per_epoch(phantom_root, train_frame):
    kwargs = {"frame": train_frame, "augment": True, "seed": 5, **SMALL}
    a, b = SpineDataset(phantom_root, **kwargs), SpineDataset(phantom_root, **kwargs)
    first = a[1]
    assert torch.equal(first["image"], b[1]["image"]) and torch.equal(first["location"], b[1]["location"])
    a.set_epoch(1)
    assert not torch.equal(first["image"], a[1]["image"])
    assert not torch.equal(first["image"], SpineDataset(phantom_root, frame=train_frame, **SMALL)[1]["image"])


def test_test_split_has_no_labels_or_targets(phantom_root):
    data = SpineDataset(phantom_root, split="test", **SMALL)
    assert len(data) == 3
    for sample in (data[i] for i in range(len(data))):
        assert (sample["label"] == -1).all() and not sample["location_mask"].any()
        assert sample["plane_mask"].any() and (sample["location"] == 0).all()


def test_missing_plane_gives_zeros_and_masks(phantom_root, train_frame):
    study = int(train_frame["study_id"].iloc[0])
    frame = train_frame.copy()
    rows = (frame["study_id"] == study) & (frame["plane"] == PLANES[2])
    frame.loc[rows, "series_id"] = -1
    frame.loc[rows, ["instance_number", "x", "y"]] = np.nan
    frame.loc[rows, "candidate_series"] = pd.Series(
        [()] * int(rows.sum()), index=frame.index[rows], dtype=object
    )
    sample = SpineDataset(phantom_root, frame=frame, study_ids=[study], **SMALL)[0]
    assert sample["plane_mask"].tolist() == [True, True, False]
    assert float(sample["image"][2].abs().max()) == 0.0 and float(sample["image"][:2].max()) > 0.5
    axial = [t for t in range(NUM_TARGETS) if TARGET_PLANE_INDEX[t] == 2]
    assert not sample["location_mask"][axial].any() and sample["meta"]["series_ids"][2] == -1
    assert sample["meta"]["instance_numbers"][2].shape == (0,)


def test_unreadable_series_raises_for_train_and_warns_for_test(phantom_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(phantom_root, root)
    for split in ("train", "test"):
        frame = load_tables(root, split)
        study, series_id = int(frame["study_id"].iloc[0]), int(frame["series_id"].iloc[0])  # a sag T2 series
        for path in series_path(root, split, study, series_id).glob("*.dcm"):
            path.write_bytes(b"garbage")
        if split == "train":
            with pytest.raises(SpineDataError, match="not a DICOM|cannot parse"):
                SpineDataset(root, split, study_ids=[study], **SMALL)[0]
            data = SpineDataset(root, split, study_ids=[study], on_bad_series="warn", **SMALL)
        else:
            data = SpineDataset(root, split, study_ids=[study], **SMALL)
        with pytest.warns(UserWarning, match=f"series {series_id} of study {study}"):
            sample = data[0]
        assert not sample["plane_mask"][1] and float(sample["image"][1].abs().max()) == 0.0
        assert not sample["location_mask"][
            [t for t in range(NUM_TARGETS) if TARGET_PLANE_INDEX[t] == 1]
        ].any()


def test_collate_stacks_a_batch(phantom_root, train_frame):
    data = SpineDataset(phantom_root, frame=train_frame, channels="single", **SMALL)
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 6, 3, 32, 32)
    assert batch["plane_mask"].shape == (3, 3) and batch["label"].shape == (3, 25)
    assert batch["location"].shape == (3, 25, 3) and batch["location_mask"].shape == (3, 25)
    assert len(batch["text"]) == 3 and batch["text"][0][0] == QUERY_TEXTS[0]
    assert [m["study_id"] for m in batch["meta"]] == data.study_ids[:3]
    assert torch.equal(batch["image"][:, :, :, 0], batch["image"][:, :, :, 2])  # single: replicated


def test_bad_arguments_are_rejected(phantom_root, train_frame):
    with pytest.raises(SpineDataError, match="study ids"):
        SpineDataset(phantom_root, frame=train_frame, study_ids=[123456789])
    with pytest.raises(ValueError, match="channels"):
        SpineDataset(phantom_root, frame=train_frame, channels="3d")
    with pytest.raises(ValueError, match="on_bad_series"):
        SpineDataset(phantom_root, frame=train_frame, on_bad_series="ignore")
    with pytest.raises(SpineDataError, match="targets"):
        SpineDataset(phantom_root, frame=train_frame[train_frame["target"] != 3])
    assert len(LABEL_COLUMNS) == NUM_TARGETS


def _turn_sagittal(folder: Path) -> None:
    """Rewrite an axial series (slices along +z) as sagittal slices along +x, order kept."""
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]  # normal +x: a sagittal slice
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[2]), 0.0, 0.0]
        ds.save_as(path)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """One study, 20x24 (non-square) images, two Sagittal T2/STIR series, no axial series."""
    from test_cache import write_series  # the DICOM writer of the cache tests

    root = tmp_path_factory.mktemp("tiny")
    planes = {1001: ("Sagittal T1", 7), 1002: ("Sagittal T2/STIR", 9), 1004: ("Sagittal T2/STIR", 5)}
    for series, (_, n) in planes.items():
        write_series(root / "train_images" / "100" / str(series), n=n, seed=series)
        _turn_sagittal(root / "train_images" / "100" / str(series))  # as described: the reader checks
    pd.DataFrame(
        [(100, s, d) for s, (d, _) in planes.items()], columns=["study_id", "series_id", "series_description"]
    ).to_csv(root / "train_series_descriptions.csv", index=False)
    pd.DataFrame([[100] + ["Moderate"] * 25], columns=["study_id", *LABEL_COLUMNS]).to_csv(
        root / "train.csv", index=False
    )
    coords = [  # instance numbers of a series with n slices run 11 .. 10 + n
        (1004, 12, "Spinal Canal Stenosis", "L1/L2", 6.0, 5.0),
        (1004, 14, "Spinal Canal Stenosis", "L2/L3", 12.0, 10.0),
        (1002, 13, "Spinal Canal Stenosis", "L3/L4", 9.0, 9.0),  # not on the chosen series
        (1001, 12, "Left Neural Foraminal Narrowing", "L1/L2", 3.0, 4.0),
    ]
    pd.DataFrame(
        [(100, *c) for c in coords],
        columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"],
    ).to_csv(root / "train_label_coordinates.csv", index=False)
    return root


def test_targets_on_non_square_images_and_majority_series(tiny_root):
    sample = SpineDataset(tiny_root, num_slices=9, image_size=16)[0]
    meta = sample["meta"]
    assert meta["series_ids"] == [1001, 1004, -1]  # 2 of the 3 spinal coordinates lie on 1004
    assert sample["plane_mask"].tolist() == [True, True, False] and meta["original_shape"][0] == (20, 24)
    assert sorted(np.flatnonzero(sample["location_mask"].numpy()).tolist()) == [0, 1, 5]
    for t, instance, x, y in ((0, 12, 6.0, 5.0), (1, 14, 12.0, 10.0), (5, 12, 3.0, 4.0)):
        s, nx, ny = sample["location"][t].tolist()
        assert meta["instance_numbers"][TARGET_PLANE_INDEX[t]][int(s)] == instance
        assert (nx, ny) == pytest.approx((x / 24, y / 20))  # x over the width, y over the height
    assert (sample["label"] == 1).all()


def test_label_on_a_missing_instance_follows_the_policy(tiny_root):
    frame = load_tables(tiny_root)
    frame.loc[(frame["target"] == 0), "instance_number"] = 99.0
    with pytest.raises(SpineDataError, match="instance 99 is not a slice"):
        SpineDataset(tiny_root, frame=frame, **SMALL)[0]
    with pytest.warns(UserWarning, match="instance 99 is not a slice"):
        sample = SpineDataset(tiny_root, frame=frame, on_bad_series="warn", **SMALL)[0]
    assert not sample["location_mask"][0] and sample["location_mask"][1]


def test_splits_are_study_disjoint_and_deterministic(train_frame):
    rows = train_frame["study_id"].tolist()  # 25 rows per study: splitting must collapse them
    ids = sorted(set(rows))
    train, val = study_split(rows, val_fraction=0.25, seed=1)
    assert not set(train) & set(val) and sorted(train + val) == ids and len(val) == 2
    assert (train, val) == study_split(list(reversed(rows)), val_fraction=0.25, seed=1)
    assert study_split(range(100), seed=1) != study_split(range(100), seed=2)
    folds = [kfold_split(ids, k=3, fold=f, seed=0) for f in range(3)]
    vals = [set(v) for _, v in folds]
    assert set().union(*vals) == set(ids) and sum(len(v) for v in vals) == len(ids)
    for tr, va in folds:
        assert not set(tr) & set(va) and sorted(tr + va) == ids
    assert folds[0] == kfold_split(ids, k=3, fold=0, seed=0)
    with pytest.raises(ValueError):
        kfold_split(ids, k=3, fold=3)
    with pytest.raises(ValueError):
        study_split(ids, val_fraction=1.0)
