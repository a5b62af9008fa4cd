"""The phantom dataset: RSNA layout, readable DICOMs, determinism, label noise, geometry, signal, scores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from spinemm.constants import CONDITION_NAMES, LABEL_COLUMNS, LEVEL_NAMES, PLANES, SUBMISSION_COLUMNS
from spinemm.data import make_phantom
from spinemm.data.phantom import _sample_labels, noise_transition
from spinemm.data.phantom_anatomy import finding_point, sample_anatomy
from spinemm.data.phantom_dicom import acquire, locate, plan_axial, plan_sagittal
from spinemm.data.tables import load_tables, series_path
from spinemm.metrics import rsna_score, submission_frame

N_TRAIN, N_TEST, SIZE = 8, 3, 64  # the conftest fixture


def _csv(root, name):
    return pd.read_csv(root / name, keep_default_na=False, dtype=str)


def _dicoms(root):
    return sorted(root.glob("*_images/*/*/*.dcm"))


def test_layout_and_columns(phantom_root):
    train = _csv(phantom_root, "train.csv")
    assert list(train.columns) == ["study_id", *LABEL_COLUMNS]
    assert len(train) == N_TRAIN
    assert set(np.unique(train[list(LABEL_COLUMNS)].to_numpy())) <= {"Normal/Mild", "Moderate", "Severe", ""}
    coords = _csv(phantom_root, "train_label_coordinates.csv")
    assert list(coords.columns) == [
        "study_id",
        "series_id",
        "instance_number",
        "condition",
        "level",
        "x",
        "y",
    ]
    assert set(coords.condition) <= set(CONDITION_NAMES) and set(coords.level) <= set(LEVEL_NAMES)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        series = _csv(phantom_root, f"{split}_series_descriptions.csv")
        assert list(series.columns) == ["study_id", "series_id", "series_description"]
        assert set(series.series_description) <= set(PLANES)
        assert series.study_id.nunique() == n
        # Exactly the listed series exist on disk, each holding only {instance_number}.dcm files.
        on_disk = sorted((p.parent.name, p.name) for p in (phantom_root / f"{split}_images").glob("*/*"))
        assert on_disk == sorted(zip(series.study_id, series.series_id, strict=True))
        for study, sid in zip(series.study_id.astype(int), series.series_id.astype(int), strict=True):
            files = list(series_path(phantom_root, split, study, sid).iterdir())
            assert files and all(f.suffix == ".dcm" and f.stem.isdigit() for f in files)
    train_ids = set(train.study_id.astype(int))
    test_ids = set(_csv(phantom_root, "test_series_descriptions.csv").study_id.astype(int))
    assert train_ids.isdisjoint(test_ids)
    series_ids = pd.concat(
        [_csv(phantom_root, f"{s}_series_descriptions.csv") for s in ("train", "test")]
    ).series_id
    for ids in (train_ids | test_ids, set(series_ids.astype(int))):
        assert all(7 <= len(str(i)) <= 10 for i in ids)
    assert series_ids.is_unique

    # A missing series and a duplicated Axial T2 both occur among the training studies.
    series = _csv(phantom_root, "train_series_descriptions.csv")
    per_study = series.groupby("study_id").series_description
    assert (per_study.nunique() < 3).any()
    assert (series[series.series_description == "Axial T2"].groupby("study_id").size() == 2).any()

    sample = pd.read_csv(phantom_root / "sample_submission.csv")
    assert list(sample.columns) == ["row_id", *SUBMISSION_COLUMNS] and len(sample) == N_TEST * 25
    assert np.allclose(sample[list(SUBMISSION_COLUMNS)].to_numpy(), 1 / 3)
    solution = pd.read_csv(phantom_root / "solution.csv")
    assert list(solution.columns) == ["row_id", *SUBMISSION_COLUMNS, "sample_weight"]
    assert {int(r.split("_")[0]) for r in solution.row_id} == test_ids
    truth = pd.read_csv(phantom_root / "phantom_truth.csv")
    assert list(truth.columns) == [
        "study_id",
        "split",
        "column",
        "true_label",
        "recorded_label",
        "latent_severity",
    ]
    info = json.loads((phantom_root / "phantom_info.json").read_text())
    assert info["n_studies"] == N_TRAIN and info["n_test"] == N_TEST and info["image_size"] == SIZE
    assert {"seed", "label_noise", "class_prior", "oracle_score", "prior_score", "format_version"} <= set(
        info
    )

    # The project's own reader accepts the tables: every labelled target got its coordinate's series.
    frame = load_tables(phantom_root, "train")
    assert len(frame) == N_TRAIN * 25
    assert frame.instance_number.notna().sum() == len(coords)


def test_every_dicom_reads_back(phantom_root):
    described = {
        int(s): d
        for split in ("train", "test")
        for s, d in _csv(phantom_root, f"{split}_series_descriptions.csv")[
            ["series_id", "series_description"]
        ].to_numpy()
    }
    uids, geometric_order = set(), []
    by_series: dict[int, list] = {}
    for path in _dicoms(phantom_root):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.Modality == "MR" and ds.SeriesDescription == described[int(path.parent.name)]
        assert int(ds.InstanceNumber) == int(path.stem) and int(ds.PatientID) == int(path.parent.parent.name)
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint16 and pixels.shape == (SIZE, SIZE) and pixels.max() > 0
        assert float(ds.RescaleSlope) > 0 and len(ds.PixelSpacing) == 2 and float(ds.SliceThickness) > 0
        assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
        uids.add(ds.SOPInstanceUID)
        normal = np.cross(
            np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        )
        by_series.setdefault(int(path.parent.name), []).append(
            (np.dot(normal, np.array(ds.ImagePositionPatient, float)), int(ds.InstanceNumber))
        )
    assert len(uids) == len(_dicoms(phantom_root))
    for series_id, slices in by_series.items():
        numbers = [n for _, n in sorted(slices)]
        assert min(numbers) > 1, series_id
        assert sorted(numbers) == list(range(min(numbers), min(numbers) + len(numbers)))
        geometric_order.append(numbers == sorted(numbers))
    assert not all(geometric_order)  # instance numbers are not a reliable geometric order
    counts = {d: [len(v) for k, v in by_series.items() if described[k] == d] for d in PLANES}
    assert all(12 <= n <= 18 for d in PLANES[:2] for n in counts[d])
    assert all(15 <= n <= 25 for n in counts["Axial T2"])


def test_same_seed_same_bytes(tmp_path):
    args = dict(n_studies=3, n_test=2, image_size=32, progress=False)
    # written in this process and by two worker processes: the same bytes
    a, b = make_phantom(tmp_path / "a", seed=5, **args), make_phantom(tmp_path / "b", seed=5, workers=2, **args)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = make_phantom(tmp_path / "c", seed=6, **args)
    assert (c / "train.csv").read_bytes() != (a / "train.csv").read_bytes()
    with pytest.raises(ValueError, match="already holds"):
        make_phantom(a, seed=5, **args)
    with pytest.raises(ValueError, match="n_studies"):
        make_phantom(tmp_path / "d", n_studies=0)
    with pytest.raises(ValueError, match="workers"):
        make_phantom(tmp_path / "d", n_studies=3, workers=0)


def test_axial_slices_per_level_sets_the_axial_series_length(tmp_path):
    args = dict(n_studies=2, n_test=2, seed=3, image_size=24, progress=False)
    default = make_phantom(tmp_path / "default", **args)
    real = make_phantom(tmp_path / "real", axial_slices=(6, 10), **args)
    for root, low, high in ((default, 15, 25), (real, 30, 50)):
        described = pd.concat([pd.read_csv(root / f"{split}_series_descriptions.csv").assign(split=split)
                               for split in ("train", "test")])
        axial = described[described.series_description == "Axial T2"]
        counts = [len(list(series_path(root, row.split, row.study_id, row.series_id).glob("*.dcm")))
                  for row in axial.itertuples(index=False)]
        assert counts and all(low <= n <= high for n in counts), counts
    info = json.loads((real / "phantom_info.json").read_text())
    assert info["axial_slices"] == [6, 10] and "axial_slices" not in json.loads((default / "phantom_info.json").read_text())
    # the labels come from streams of their own: the same as without the option
    assert (real / "train.csv").read_bytes() == (default / "train.csv").read_bytes()
    with pytest.raises(ValueError, match="axial_slices"):
        make_phantom(tmp_path / "bad", axial_slices=(5, 4), **args)


def test_label_noise_and_prior():
    rng = np.random.default_rng(0)
    latent, true, recorded = _sample_labels(rng, 4000, 0.2)
    kept = recorded >= 0
    assert abs((~kept).mean() - 0.01) < 0.003  # empty cells
    moved = recorded[kept] != true[kept]
    assert abs(moved.mean() - 0.2) < 0.01
    assert np.all(np.abs(recorded[kept] - true[kept]) <= 1)  # only to a neighbouring class
    prior = np.bincount(true.ravel(), minlength=3) / true.size
    assert 0.72 < prior[0] < 0.84 and 0.11 < prior[1] < 0.19 and 0.04 < prior[2] < 0.1
    by_level = true.reshape(-1, 5, 5)
    assert (by_level[:, :, 3] > 0).mean() > 2 * (by_level[:, :, 0] > 0).mean()  # L4/L5 vs L1/L2
    # Degeneration correlates within a study.
    per_study = (true > 0).mean(1)
    assert np.corrcoef(per_study[::2], latent[::2].mean(1))[0, 1] > 0.5
    # Latent severity is continuous and ordered with the true class, with overlap between classes.
    assert latent[true == 0].max() > latent[true == 1].min()
    assert latent[true == 0].mean() < latent[true == 1].mean() < latent[true == 2].mean()


def test_noise_free_phantom_reaches_the_oracle(tmp_path):
    root = make_phantom(tmp_path / "p", n_studies=3, n_test=3, image_size=32, label_noise=0.0, progress=False)
    truth = pd.read_csv(root / "phantom_truth.csv")
    kept = truth.recorded_label >= 0
    assert (truth.true_label[kept] == truth.recorded_label[kept]).all()
    info = json.loads((root / "phantom_info.json").read_text())
    assert info["oracle_score"] < 1e-6 < info["prior_score"]


def test_truth_solution_and_scores_agree(phantom_root):
    truth = pd.read_csv(phantom_root / "phantom_truth.csv")
    info = json.loads((phantom_root / "phantom_info.json").read_text())
    test = truth[truth.split == "test"]
    labelled = test[test.recorded_label >= 0]
    solution = pd.read_csv(phantom_root / "solution.csv")
    assert list(solution.row_id) == [
        f"{s}_{c}" for s, c in zip(labelled.study_id, labelled.column, strict=True)
    ]
    assert (
        solution[list(SUBMISSION_COLUMNS)].to_numpy().argmax(1) == labelled.recorded_label.to_numpy()
    ).all()
    assert np.array_equal(
        solution.sample_weight.to_numpy(), np.array([1.0, 2.0, 4.0])[labelled.recorded_label]
    )
    # The oracle predicts P(recorded | true) per row; recomputing it from the truth file gives info's score.
    ids = np.unique(test.study_id.to_numpy())
    true = test.sort_values(["study_id"], kind="stable").true_label.to_numpy().reshape(len(ids), 25)
    oracle = submission_frame(ids, noise_transition(info["label_noise"])[true])
    assert rsna_score(solution, oracle) == pytest.approx(info["oracle_score"])
    assert info["oracle_score"] < info["prior_score"]
    # The recorded train labels are train.csv's cells.
    train = _csv(phantom_root, "train.csv").set_index("study_id")
    names = np.array(["Normal/Mild", "Moderate", "Severe", ""])
    rows = truth[truth.split == "train"]
    cells = train.loc[rows.study_id.astype(str)].to_numpy()[
        np.arange(len(rows)), [LABEL_COLUMNS.index(c) for c in rows.column]
    ]
    assert (cells == names[rows.recorded_label]).all()


def _patient_point(ds, x, y):
    """Patient mm of pixel (x = column, y = row) of a DICOM slice."""
    iop = np.array(ds.ImageOrientationPatient, float)
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    return np.array(ds.ImagePositionPatient, float) + x * col_mm * iop[:3] + y * row_mm * iop[3:]


def test_coordinates_sit_on_instances_and_planes_agree(phantom_root):
    coords = pd.read_csv(phantom_root / "train_label_coordinates.csv")
    series = pd.read_csv(phantom_root / "train_series_descriptions.csv").set_index("series_id")
    points = {}
    for r in coords.itertuples():
        assert series.loc[r.series_id, "study_id"] == r.study_id
        path = (
            series_path(phantom_root, "train", int(r.study_id), int(r.series_id))
            / f"{int(r.instance_number)}.dcm"
        )
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert 0 <= r.x < ds.Columns and 0 <= r.y < ds.Rows
        points[(r.study_id, r.condition, r.level)] = _patient_point(ds, r.x, r.y)
    # The three planes agree in patient space: the midpoint of the left/right foraminal points
    # (Sagittal T1) and of the left/right subarticular points (Axial T2) lie close to the canal
    # point (Sagittal T2) of the same level; left is +x (LPS).
    checked = 0
    for (study, condition, level), canal in points.items():
        if condition != "Spinal Canal Stenosis":
            continue
        for side in ("Neural Foraminal Narrowing", "Subarticular Stenosis"):
            left, right = (
                points.get((study, f"Left {side}", level)),
                points.get((study, f"Right {side}", level)),
            )
            if left is None or right is None:
                continue
            assert left[0] - right[0] > 10
            assert np.linalg.norm((left + right) / 2 - canal) < 10, (study, level, side)
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize(
    "condition, make_plan",
    [
        (0, lambda rng, anat: plan_sagittal(rng, anat, "Sagittal T2/STIR", 128)),
        (1, lambda rng, anat: plan_sagittal(rng, anat, "Sagittal T1", 128)),
        (4, lambda rng, anat: plan_axial(rng, anat, 128)),
    ],
)
def test_severity_darkens_the_finding(condition, make_plan):
    """Same spine, scanner and noise; only the L4/L5 severity of one condition differs."""
    means = []
    for severity in (0.0, 3.0):
        sev = np.zeros((5, 5))
        sev[condition, 3] = severity
        anat = sample_anatomy(np.random.default_rng(1), sev)
        rng = np.random.default_rng(2)
        plan = make_plan(rng, anat)
        stored, slope, intercept = acquire(rng, anat, plan)
        k, x, y = locate(plan, finding_point(anat, condition, 3))
        image = stored[k] * slope + intercept
        r = max(1, round(5 / plan.pixel_spacing))  # ~5 mm around the finding
        means.append(
            image[round(y) - r : round(y) + r + 1, round(x) - r : round(x) + r + 1].mean()
            / np.percentile(image, 99)
        )
    normal, severe = means
    assert severe < 0.85 * normal  # CSF (T2) or perineural fat (T1) is replaced by dark tissue
