"""Per-slice geometry (issue 14): axial series acquired as blocks angled to each disc.

A :class:`Series` keeps each slice's own orientation; slices are ordered within a block along its
normal and blocks along the body axis; point mapping and location errors use each slice's plane.
The phantom's oblique axial plans are the ground truth: they place every pixel in patient space.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from test_dicom import SAGITTAL, write_slice

from spinemm.constants import CONDITION_NAMES, LEVEL_NAMES, PLANES
from spinemm.data.dicom import read_series
from spinemm.data.phantom import make_phantom
from spinemm.data.phantom_anatomy import finding_point, sample_anatomy
from spinemm.data.phantom_dicom import acquire, locate, plan_axial, plan_sagittal, write_series
from spinemm.data.series import map_point
from spinemm.data.store import SeriesStore
from spinemm.data.tables import series_path
from spinemm.errors import SpineDataError
from spinemm.pipeline.location_errors import location_errors

STUDY, SAG_ID, AX_ID = 7, 70, 71


def _tilted_axial(degrees: float) -> tuple[float, ...]:
    """Axial cosines tilted about the patient's left-right axis (rows stay along x)."""
    a = math.radians(degrees)
    return (1.0, 0.0, 0.0, 0.0, math.cos(a), math.sin(a))


def _plan_point(plan, j: int, x: float, y: float) -> np.ndarray:
    """Patient point of pixel (x, y) of plan slice ``j``: the phantom's own geometry."""
    cosines = plan.slice_orientations()[j]
    return plan.positions[j] + x * plan.pixel_spacing * cosines[0] + y * plan.pixel_spacing * cosines[1]


@pytest.fixture(scope="module")
def oblique_study(tmp_path_factory):
    """One phantom study: a Sagittal T2 and an Axial T2 with one block per level, written as the
    phantom writes them, under the RSNA layout."""
    root = tmp_path_factory.mktemp("oblique")
    rng = np.random.default_rng(5)
    anat = sample_anatomy(rng, np.zeros((5, 5)))
    plans = {SAG_ID: plan_sagittal(rng, anat, PLANES[1], 64), AX_ID: plan_axial(rng, anat, 64, oblique=True)}
    for number, (series_id, plan) in enumerate(plans.items(), start=1):
        stored, slope, intercept = acquire(rng, anat, plan)
        ids = {"study_id": STUDY, "series_id": series_id, "series_number": number, "study_uid": "1.2.3",
               "series_uid": f"1.2.3.{series_id}", "frame_uid": "1.2.3.9"}
        write_series(series_path(root, "train", STUDY, series_id), plan, stored, (slope, intercept), ids, rng)
    series = {sid: read_series(series_path(root, "train", STUDY, sid)) for sid in plans}
    return root, anat, plans, series


def _series_index(series, plan, j: int) -> int:
    return series.instance_to_index[int(plan.instance_numbers[j])]


def test_each_slice_keeps_its_block_orientation_and_blocks_follow_the_body(oblique_study):
    _, _, plans, series = oblique_study
    plan, axial = plans[AX_ID], series[AX_ID]
    blocks = axial.blocks()
    assert len(blocks) == 5 and axial.orientations is not None
    normals = [np.cross(*axial.orientations[b[0]]) for b in blocks]
    assert max(math.degrees(math.acos(min(1.0, abs(a @ b)))) for a in normals for b in normals) > 5.0
    for j in range(len(plan.positions)):
        np.testing.assert_allclose(axial.orientations[_series_index(axial, plan, j)], plan.orientations[j], atol=1e-6)
    for block, normal in zip(blocks, normals, strict=True):  # ascending along the block's own normal
        assert np.all(np.diff(axial.positions[block] @ normal) > 0)
    # blocks run along the body: their centres ascend along the mean normal (towards the head)
    axis = np.mean(normals, axis=0)
    assert np.all(np.diff([axial.positions[b].mean(0) @ axis for b in blocks]) > 0)


def test_voxel_to_patient_uses_each_slices_plane(oblique_study):
    _, _, plans, series = oblique_study
    plan, axial = plans[AX_ID], series[AX_ID]
    pixels = np.random.default_rng(0).uniform(0, 63, size=(len(plan.positions), 2))
    voxels = np.array([[x, y, _series_index(axial, plan, j)] for j, (x, y) in enumerate(pixels)], dtype=float)
    expected = np.stack([_plan_point(plan, j, x, y) for j, (x, y) in enumerate(pixels)])
    np.testing.assert_allclose(axial.voxel_to_patient(voxels), expected, atol=1e-3)
    np.testing.assert_allclose(axial.patient_to_voxel(expected), voxels, atol=1e-4)


def test_sagittal_canal_point_maps_into_its_levels_block(oblique_study):
    _, anat, plans, series = oblique_study
    sagittal, axial = series[SAG_ID], series[AX_ID]
    for level in range(5):
        j, x, y = locate(plans[SAG_ID], finding_point(anat, 0, level))  # the canal label on the sagittal
        k = _series_index(sagittal, plans[SAG_ID], j)
        on_sagittal = _plan_point(plans[SAG_ID], j, x, y)
        mx, my, mk = map_point(sagittal, x, y, k, axial)
        expected = _series_index(axial, plans[AX_ID], locate(plans[AX_ID], on_sagittal)[0])
        assert round(mk) == expected, f"level {LEVEL_NAMES[level]}"
        assert expected in axial.blocks()[4 - level]  # its level's block (they ascend to the head: L5/S1 first)
        np.testing.assert_allclose(axial.voxel_to_patient(np.array([[mx, my, mk]])), [on_sagittal], atol=1e-4)


def test_location_errors_in_mm_match_the_phantoms_geometry(oblique_study):
    root, anat, plans, _ = oblique_study
    plan = plans[AX_ID]
    rows, truth_points = [], {}
    for condition in (3, 4):  # the subarticular findings, labelled on the axial series
        for level in range(5):
            j, x, y = locate(plan, finding_point(anat, condition, level))
            rows.append((STUDY, CONDITION_NAMES[condition], LEVEL_NAMES[level], AX_ID,
                         float(plan.instance_numbers[j]), x, y))
            truth_points[(condition, level)] = _plan_point(plan, j, x, y)
    columns = ["study_id", "condition", "level", "series_id", "instance_number", "x", "y"]
    frame = pd.DataFrame(rows, columns=columns)
    # each prediction is the label of the next level up: always on another block's slice
    predicted = frame.copy()
    predicted[["instance_number", "x", "y"]] = np.roll(frame[["instance_number", "x", "y"]].to_numpy(), -1, axis=0)
    errors = location_errors(root, "train", predicted, frame, store=SeriesStore(root, "train"))
    assert len(errors) == 10
    points = list(truth_points.values())
    expected = [np.linalg.norm(points[i] - points[(i + 1) % 10]) for i in range(10)]
    np.testing.assert_allclose(errors.error_mm.to_numpy(), expected, atol=1e-3)
    assert min(expected) > 10.0  # the predictions really are elsewhere


def test_sagittal_and_axial_slices_in_one_series_are_refused(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for k, orientation in enumerate([SAGITTAL, SAGITTAL, _tilted_axial(0), _tilted_axial(0)], start=1):
        write_slice(folder / f"{k}.dcm", np.full((16, 16), k, np.uint16), instance=k,
                    position=(float(k), 0.0, float(k)), orientation=orientation)
    with pytest.raises(SpineDataError, match=r"mixed: slice .* 90 degrees .*not a set of parallel"):
        read_series(folder)


def test_two_tilted_blocks_are_ordered_and_mapped(tmp_path):
    """Hand-made blocks at -12 and +15 degrees, files shuffled: order and mapping by definition."""
    folder = tmp_path / "blocks"
    folder.mkdir()
    written = {}
    for block, (degrees, z0) in enumerate([(15.0, 40.0), (-12.0, 0.0)]):  # the upper block first
        orientation = _tilted_axial(degrees)
        normal = np.cross(orientation[:3], orientation[3:])
        for i in (2, 0, 1):
            instance = 10 * block + i + 1
            position = (-8.0, -8.0, z0) + 4.0 * i * normal
            write_slice(folder / f"{instance}.dcm", np.full((16, 16), instance, np.uint16), instance=instance,
                        position=tuple(position), orientation=orientation, spacing=(0.5, 0.5))
            written[instance] = (np.array(position), np.array(orientation).reshape(2, 3))
    series = read_series(folder)
    assert series.instance_numbers.tolist() == [11, 12, 13, 1, 2, 3]  # lower block first, each ascending
    assert series.slice_spacing == pytest.approx(4.0)
    for k, instance in enumerate(series.instance_numbers):
        position, cosines = written[int(instance)]
        expected = position + 3 * 0.5 * cosines[0] + 5 * 0.5 * cosines[1]
        np.testing.assert_allclose(series.voxel_to_patient(np.array([[3.0, 5.0, k]])), [expected], atol=1e-4)
        assert series.volume[k, 0, 0] == instance


def test_the_phantom_writes_oblique_axials_in_a_share_of_studies(tmp_path):
    root = make_phantom(tmp_path / "p", n_studies=6, n_test=2, seed=1, image_size=32, progress=False,
                        oblique_axial=0.5)
    info = json.loads((root / "phantom_info.json").read_text())
    oblique = set(info["studies_oblique_axial"])
    assert 0 < len(oblique) < 8
    described = pd.read_csv(root / "train_series_descriptions.csv")
    coords = pd.read_csv(root / "train_label_coordinates.csv")
    for study, series_id in described[described.series_description == "Axial T2"][["study_id", "series_id"]].itertuples(
            index=False):
        axial = read_series(series_path(root, "train", int(study), int(series_id)))
        assert (len(axial.blocks()) == 5) == (int(study) in oblique)
        labels = coords[(coords.study_id == study) & (coords.series_id == series_id)]
        assert labels.instance_number.isin(axial.instance_numbers).all()
        assert labels.x.between(-0.5, 31.5).all() and labels.y.between(-0.5, 31.5).all()
