"""The phantom: a synthetic dataset in the exact RSNA 2024 layout, with real DICOM files.

No real data reaches these machines, so :func:`make_phantom` writes studies whose images carry a
learnable but not trivial signal (DESIGN §4). Per study and (condition, level) a continuous latent
severity is drawn from a prior with a per-study and a per-level degeneration factor (degeneration is
commoner at L4/L5 and L5/S1). The latent narrows the canal, foramina and lateral recesses of an
analytic spine (:mod:`.phantom_anatomy`) that is scanned in three series (:mod:`.phantom_dicom`).
The true class is the latent plus a small grading jitter cut at two thresholds, so neighbouring
classes overlap in the images. Recorded labels add label noise at a known rate: a noisy label moves
to a neighbouring class. Beside the data the phantom writes the truth and two reference scores:
the oracle (best possible prediction given the noise) and the prior (training class frequencies).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from spinemm.constants import LABEL_COLUMNS, MISSING_LABEL, NUM_CLASSES, NUM_TARGETS, PLANES, SEVERITIES
from spinemm.errors import SpineDataError
from spinemm.metrics import score_breakdown, solution_frame, submission_frame

from .phantom_scanner import available_syntaxes
from .phantom_study import Scan, StudyJob, map_studies
from .tables import COORDINATE_COLUMNS, SERIES_COLUMNS

__all__ = ["make_phantom", "noise_transition", "FORMAT_VERSION", "VARIETIES"]

#: Version of the phantom's file set; bumped whenever the generator's output changes meaning.
FORMAT_VERSION = 1

# Latent model: L = level mean + condition mean + 0.7 study factor + 0.45 level factor + 0.6 noise,
# mapped so the class thresholds sit at latent severity 1 and 2. _CUTS are the 78% and 93% quantiles
# of L, giving about 78% Normal/Mild, 15% Moderate, 7% Severe overall.
_LEVEL_MEAN = np.array([-0.7, -0.45, -0.1, 0.45, 0.35])
_CONDITION_MEAN = np.array([-0.1, 0.0, 0.0, 0.05, 0.05])
_CUTS = (0.78, 1.56)
_GRADING_JITTER = 0.2  # sd of the grader's view of the latent, in class widths

EMPTY_CELL_RATE = 0.01  # empty train.csv cells
MISSING_COORDINATE_RATE = 0.02  # labelled targets without a coordinate row
MISSING_SERIES_RATE = 0.04  # studies lacking one plane's series
DUPLICATE_AXIAL_RATE = 0.1  # studies with a second Axial T2 series

#: ``variety`` values: None (one square matrix and vendor) or "kaggle" (the real set's variety,
#: :mod:`.phantom_scanner`), and the Axial T2 slices per level each writes by default.
VARIETIES = {None: (3, 5), "kaggle": (6, 12)}

_OUTPUTS = (
    "train.csv",
    "train_label_coordinates.csv",
    "train_series_descriptions.csv",
    "test_series_descriptions.csv",
    "sample_submission.csv",
    "solution.csv",
    "phantom_truth.csv",
    "phantom_info.json",
    "train_images",
    "test_images",
)
#: Written first and removed last: a folder holding it is an interrupted phantom.
_UNFINISHED = ".phantom-unfinished"


def noise_transition(label_noise: float) -> np.ndarray:
    """``[3, 3]`` matrix P(recorded | true): a noisy label moves to a neighbouring class."""
    r = float(label_noise)
    return np.array([[1 - r, r, 0.0], [r / 2, 1 - r, r / 2], [0.0, r, 1 - r]])


def _sample_labels(rng: np.random.Generator, n: int, label_noise: float):
    """Latent severity, true and recorded labels, each ``[n, 25]`` in LABEL_COLUMNS order."""
    study = rng.normal(size=(n, 1, 1))
    level = rng.normal(size=(n, 1, 5))
    latent = (
        _LEVEL_MEAN + _CONDITION_MEAN[:, None] + 0.7 * study + 0.45 * level + 0.6 * rng.normal(size=(n, 5, 5))
    )
    severity = 1.0 + (latent - _CUTS[0]) / (_CUTS[1] - _CUTS[0])
    graded = severity + _GRADING_JITTER * rng.normal(size=severity.shape)
    true = (graded >= 1.0).astype(np.int64) + (graded >= 2.0)
    severity, true = severity.reshape(n, NUM_TARGETS), true.reshape(n, NUM_TARGETS)

    # Inverse-CDF draw from each row of the transition matrix.
    cdf = np.cumsum(noise_transition(label_noise), axis=1)[true]  # [n, 25, 3]
    recorded = np.minimum((rng.random(true.shape)[..., None] >= cdf).sum(-1), NUM_CLASSES - 1)
    recorded[rng.random(true.shape) < EMPTY_CELL_RATE] = MISSING_LABEL
    return severity, true, recorded


def _unique_ids(rng: np.random.Generator, n: int, taken: set[int]) -> list[int]:
    """``n`` new random ids of 7 to 10 digits, unique among themselves and ``taken``."""
    out: list[int] = []
    while len(out) < n:
        digits = int(rng.integers(7, 11))
        value = int(rng.integers(10 ** (digits - 1), 10**digits))
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def _check_args(n_studies: int, n_test: int, image_size: int, label_noise: float, workers: int | None) -> None:
    for name, value, low in (
        ("n_studies", n_studies, 1),
        ("n_test", n_test, 1),
        ("image_size", image_size, 16),
        *((("workers", workers, 1),) if workers is not None else ()),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0.0 <= float(label_noise) <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise!r}")


def _study_series(rng: np.random.Generator, n_total: int, n_studies: int, taken: set[int]):
    """(series_id, description) of each study's series: the three planes, except that a few
    studies lack one plane and some have a second Axial T2 series."""
    anomaly = rng.random(n_total)
    missing = rng.integers(0, len(PLANES), n_total)
    if n_studies >= 4:  # make sure even a small training set shows both oddities
        anomaly[0], anomaly[1] = 0.0, 1.0 - DUPLICATE_AXIAL_RATE / 2
    out = []
    for i in range(n_total):
        planes = list(PLANES)
        if anomaly[i] < MISSING_SERIES_RATE:
            planes.remove(PLANES[missing[i]])
        elif anomaly[i] >= 1.0 - DUPLICATE_AXIAL_RATE:
            planes.append("Axial T2")
        out.append(list(zip(_unique_ids(rng, len(planes), taken), planes, strict=True)))
    return out


def _scores(
    train_recorded: np.ndarray,
    test_ids: np.ndarray,
    test_true: np.ndarray,
    test_recorded: np.ndarray,
    label_noise: float,
) -> tuple[pd.DataFrame, dict]:
    """Kaggle solution of the test studies and the oracle / prior reference scores."""
    solution = solution_frame(test_ids, test_recorded)
    oracle = submission_frame(test_ids, noise_transition(label_noise)[test_true])
    # Training class frequency per column, add-one smoothed so an unseen class is not scored as p = 0.
    counts = np.stack([(train_recorded == k).sum(0) for k in range(NUM_CLASSES)], axis=-1) + 1.0
    prior = counts / counts.sum(-1, keepdims=True)  # [25, 3]
    prior_sub = submission_frame(test_ids, np.broadcast_to(prior, (len(test_ids), NUM_TARGETS, NUM_CLASSES)))
    oracle_terms, prior_terms = score_breakdown(solution, oracle), score_breakdown(solution, prior_sub)
    return solution, {
        "oracle_score": oracle_terms["score"],
        "prior_score": prior_terms["score"],
        "oracle_breakdown": oracle_terms,
        "prior_breakdown": prior_terms,
    }


def make_phantom(
    root: str | os.PathLike,
    n_studies: int = 60,
    seed: int = 0,
    image_size: int = 128,
    n_test: int | None = None,
    label_noise: float = 0.1,
    progress: bool = True,
    workers: int | None = 1,
    oblique_axial: float = 0.0,
    axial_slices: tuple[int, int] | None = None,
    variety: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic RSNA 2024 Lumbar Spine dataset under ``root`` and return ``root``.

    ``n_studies`` training studies and ``n_test`` held-out test studies (default
    ``max(2, n_studies // 5)``), square images of ``image_size`` pixels. Writes the RSNA layout
    (``train.csv``, ``train_label_coordinates.csv``, ``{train,test}_series_descriptions.csv``,
    ``sample_submission.csv``, ``{train,test}_images/{study}/{series}/{instance}.dcm``) plus

    - ``solution.csv``: Kaggle solution of the test studies (one-hot recorded labels, sample_weight);
    - ``phantom_truth.csv``: per study and label column the true label, the recorded label (class
      indices into ``SEVERITIES``; -1 for an empty cell) and the continuous latent severity;
    - ``phantom_info.json``: the arguments, the class prior, the noise transition matrix and the
      official scores of the oracle (``P(recorded | true)`` per row) and of the training prior.

    Studies are written by ``workers`` processes (1: in this process; None: one per available core,
    8 studies or more each). ``oblique_axial``: the share of studies whose Axial T2 series are
    acquired as one block per level, each perpendicular to the spine at its own disc (so the slices
    of one series differ in orientation, as in many real studies); 0 keeps one orientation per
    series (and the output of earlier versions). ``axial_slices``: the fewest and most slices of an
    Axial T2 series at each of the five levels (default 3-5, which keeps the output of earlier
    versions; real studies hold 30-60 axial slices, e.g. ``(6, 12)``, the default of a variety
    phantom). ``variety="kaggle"`` scans like the real RSNA set (:mod:`.phantom_scanner`): each
    series on its own matrix of 256-1024 px (some not square) with its own pixel spacing, acquired
    coarser and zero-filled, 15-20 sagittal slices, 12- and 16-bit vendors, rescaled values,
    MONOCHROME1 and, where pydicom can encode them, JPEG 2000, JPEG-LS and RLE lossless files;
    ``image_size`` is then unused. Worker processes are spawned, so a script that asks for them must
    call ``make_phantom`` under ``if __name__ == "__main__":``, as for a DataLoader's workers. Same arguments give byte-identical tables and identical pixels, whatever ``workers``. ``root`` must not already hold
    phantom outputs (else SpineDataError), unless ``overwrite``: then a phantom there, finished or
    interrupted, is deleted first (never a folder make_phantom did not write). Raises ValueError on
    bad arguments.
    """
    n_test = max(2, n_studies // 5) if n_test is None else n_test
    _check_args(n_studies, n_test, image_size, label_noise, workers)
    if variety not in VARIETIES:
        raise ValueError(f"variety must be one of {sorted(VARIETIES, key=str)}, got {variety!r}")
    axial_slices = VARIETIES[variety] if axial_slices is None else axial_slices
    if not 0.0 <= float(oblique_axial) <= 1.0:
        raise ValueError(f"oblique_axial must be in [0, 1], got {oblique_axial!r}")
    axial_slices = tuple(axial_slices)
    if len(axial_slices) != 2 or not all(isinstance(n, (int, np.integer)) for n in axial_slices) \
            or not 1 <= axial_slices[0] <= axial_slices[1]:
        raise ValueError(f"axial_slices must be two integers 1 <= fewest <= most, got {axial_slices!r}")
    root = Path(root)
    if overwrite:
        _remove_phantom(root)
    clash = [name for name in _OUTPUTS if (root / name).exists()]
    if clash:
        raise SpineDataError(f"{root} already holds phantom outputs {clash}; use an empty folder, or "
                             f"overwrite=True (spinemm phantom --overwrite) if it is a phantom")
    root.mkdir(parents=True, exist_ok=True)
    (root / _UNFINISHED).write_text("make_phantom is writing here; removed when it has finished\n")

    n_total = n_studies + n_test
    ids_ss, labels_ss, coords_ss, images_ss = np.random.SeedSequence(seed).spawn(4)
    id_rng = np.random.default_rng(ids_ss)
    severity, true, recorded = _sample_labels(np.random.default_rng(labels_ss), n_total, label_noise)
    taken: set[int] = set()
    study_ids = np.asarray(_unique_ids(id_rng, n_total, taken), dtype=np.int64)
    split = np.array(["train"] * n_studies + ["test"] * n_test)
    series = _study_series(id_rng, n_total, n_studies, taken)
    coord_rng = np.random.default_rng(coords_ss)
    labelled = (recorded != MISSING_LABEL) & (coord_rng.random(recorded.shape) >= MISSING_COORDINATE_RATE)

    study_ss = images_ss.spawn(n_total)  # one stream per study: its anatomy, scans and file order
    # a stream of its own, so the other studies come out as without the option
    oblique = np.random.default_rng([seed, 14]).random(n_total) < oblique_axial
    scan = Scan(image_size, seed, axial_slices, available_syntaxes() if variety == "kaggle" else None)
    jobs = [
        StudyJob(root, str(split[i]), int(study_ids[i]), series[i], severity[i], study_ss[i], bool(oblique[i]),
                 labelled[i] if split[i] == "train" else None)
        for i in range(n_total)
    ]
    coord_rows: list[tuple] = []
    for rows in tqdm(map_studies(jobs, scan, workers), total=n_total, desc="phantom studies", disable=not progress):
        coord_rows += rows

    # Tables list studies in id order.
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    train, test = train[np.argsort(study_ids[train])], test[np.argsort(study_ids[test])]
    table = pd.DataFrame({"study_id": study_ids[train]})
    names = np.array([*SEVERITIES, ""], dtype=object)  # index -1 (missing) -> empty cell
    for t, column in enumerate(LABEL_COLUMNS):
        table[column] = names[recorded[train, t]]
    table.to_csv(root / "train.csv", index=False)
    coords = pd.DataFrame(coord_rows, columns=list(COORDINATE_COLUMNS))
    coords.sort_values(["study_id", "series_id"], kind="stable").to_csv(
        root / "train_label_coordinates.csv", index=False
    )
    for name, rows in (("train", train), ("test", test)):
        described = pd.DataFrame(
            [(int(study_ids[i]), sid, desc) for i in rows for sid, desc in series[i]],
            columns=list(SERIES_COLUMNS),
        )
        described.sort_values(["study_id", "series_id"]).to_csv(
            root / f"{name}_series_descriptions.csv", index=False
        )
    sample = submission_frame(study_ids[test], np.full((len(test), NUM_TARGETS, NUM_CLASSES), 1.0 / 3))
    sample.to_csv(root / "sample_submission.csv", index=False)
    solution, scores = _scores(recorded[train], study_ids[test], true[test], recorded[test], label_noise)
    solution.to_csv(root / "solution.csv", index=False)

    order = np.concatenate([train, test])
    truth = pd.DataFrame(
        {
            "study_id": np.repeat(study_ids[order], NUM_TARGETS),
            "split": np.repeat(split[order], NUM_TARGETS),
            "column": np.tile(LABEL_COLUMNS, len(order)),
            "true_label": true[order].ravel(),
            "recorded_label": recorded[order].ravel(),
            "latent_severity": np.round(severity[order].ravel(), 4),
        }
    )
    truth.to_csv(root / "phantom_truth.csv", index=False)

    prior = np.bincount(true[train].ravel(), minlength=NUM_CLASSES) / true[train].size
    info = {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "n_studies": int(n_studies),
        "n_test": int(n_test),
        "image_size": int(image_size),
        "label_noise": float(label_noise),
        "label_encoding": list(SEVERITIES),
        "class_prior": dict(zip(SEVERITIES, np.round(prior, 4).tolist(), strict=True)),
        "noise_transition": noise_transition(label_noise).tolist(),
        "prior_smoothing": "add-one per label column",
        "studies_missing_series": {
            str(int(study_ids[i])): sorted(set(PLANES) - {d for _, d in series[i]})
            for i in range(n_total)
            if len({d for _, d in series[i]}) < len(PLANES)
        },
        "studies_duplicate_axial": [
            int(study_ids[i]) for i in range(n_total) if len(series[i]) > len(PLANES)
        ],
        **scores,
    }
    if oblique_axial:
        info["oblique_axial"] = float(oblique_axial)
        info["studies_oblique_axial"] = sorted(int(study_ids[i]) for i in np.flatnonzero(oblique))
    if axial_slices != (3, 5):
        info["axial_slices"] = [int(n) for n in axial_slices]
    if variety is not None:
        info["variety"] = variety
        info["transfer_syntaxes"] = list(scan.syntaxes)
    (root / "phantom_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (root / _UNFINISHED).unlink()
    return root


def _remove_phantom(root: Path) -> None:
    """Delete a phantom's outputs from ``root``: only where a finished or interrupted phantom lies
    (``phantom_info.json`` or the unfinished marker), so real data is never deleted."""
    if not any((root / name).exists() for name in (*_OUTPUTS, _UNFINISHED)):
        return
    if not ((root / "phantom_info.json").is_file() or (root / _UNFINISHED).is_file()):
        raise SpineDataError(f"{root} holds data that make_phantom did not write (no phantom_info.json): "
                             f"refusing to overwrite it")
    for name in (*_OUTPUTS, _UNFINISHED):
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
