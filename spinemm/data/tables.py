"""The three RSNA tables merged into one long frame: a row per (study, condition, level).

``train.csv`` (wide severities), ``train_label_coordinates.csv`` (one labelled point per study,
condition and level) and ``{split}_series_descriptions.csv`` (which series shows which plane) become
one frame that looks the same for train and test (the paper's "merging"), so everything downstream
reads a single table. Every CSV is validated on the way in (see :mod:`spinemm.data.validate`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from spinemm.constants import (
    CONDITION_NAMES,
    CONDITIONS,
    LABEL_COLUMNS,
    LEVEL_NAMES,
    LEVELS,
    MISSING_LABEL,
    NUM_TARGETS,
    PLANES,
    SEVERITIES,
    TARGET_PLANE_INDEX,
)
from spinemm.data.validate import (
    check_id,
    check_split,
    choice_column,
    fail_at,
    float_column,
    int_column,
    read_csv,
    unique_rows,
)

if TYPE_CHECKING:
    import datasets

TRAIN_CSV = "train.csv"
COORDINATES_CSV = "train_label_coordinates.csv"
SERIES_COLUMNS: tuple[str, ...] = ("study_id", "series_id", "series_description")
COORDINATE_COLUMNS: tuple[str, ...] = (
    "study_id",
    "series_id",
    "instance_number",
    "condition",
    "level",
    "x",
    "y",
)
#: Columns of :func:`load_tables`' frame, in order.
FRAME_COLUMNS: tuple[str, ...] = (
    "study_id",
    "target",
    "column",
    "condition",
    "level",
    "plane",
    "severity",
    "label",
    "series_id",
    "candidate_series",
    "instance_number",
    "x",
    "y",
)

# Per-target lookups, aligned with LABEL_COLUMNS (condition-major, then level).
_TARGET_CONDITION = np.array([c for c in CONDITIONS for _ in LEVELS])
_TARGET_LEVEL = np.array([lv for _ in CONDITIONS for lv in LEVELS])
_TARGET_PLANE = np.array([PLANES[p] for p in TARGET_PLANE_INDEX])
_MAX_NAMED = 10  # ids listed in a warning before "..."


def series_descriptions_file(root: str | os.PathLike, split: str) -> Path:
    """Path of ``{split}_series_descriptions.csv`` under ``root``."""
    return Path(root) / f"{check_split(split)}_series_descriptions.csv"


def series_path(root: str | os.PathLike, split: str, study_id: int, series_id: int) -> Path:
    """``root/{split}_images/{study_id}/{series_id}``: the only place ids become a path.

    ``split`` must be ``"train"`` or ``"test"`` and the ids non-negative integers (not strings), so
    no table value can steer the path elsewhere. The folder is not required to exist.
    """
    split = check_split(split)
    study = check_id(study_id, "study_id")
    series = check_id(series_id, "series_id")
    return Path(root) / f"{split}_images" / str(study) / str(series)


def load_series_descriptions(root: str | os.PathLike, split: str = "train") -> pd.DataFrame:
    """Validated ``{split}_series_descriptions.csv``, sorted by study and series.

    Returns columns ``study_id`` (int64), ``series_id`` (int64), ``series_description`` (one of
    ``PLANES``). Raises :class:`SpineDataError` on a missing file or column, a bad id, an unknown
    description or a repeated (study_id, series_id).
    """
    path = series_descriptions_file(root, split)
    raw = read_csv(path, SERIES_COLUMNS)
    out = pd.DataFrame(
        {"study_id": int_column(path, raw, "study_id"), "series_id": int_column(path, raw, "series_id")},
        index=raw.index,
    )
    choice_column(path, raw, "series_description", PLANES)
    out["series_description"] = raw["series_description"]
    unique_rows(path, raw, ("study_id", "series_id"), out)
    return out.sort_values(["study_id", "series_id"], kind="stable").reset_index(drop=True)


def _load_labels(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """``train.csv`` as (sorted study ids int64 [N], severities object [N, 25], None where empty)."""
    path = root / TRAIN_CSV
    raw = read_csv(path, ("study_id", *LABEL_COLUMNS))
    ids = int_column(path, raw, "study_id")
    unique_rows(path, raw, ("study_id",), pd.DataFrame({"study_id": ids}, index=raw.index))
    values = raw[list(LABEL_COLUMNS)].to_numpy(dtype=object)
    bad = ~np.isin(values, [*SEVERITIES, ""])
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        column = LABEL_COLUMNS[int(np.flatnonzero(bad[row])[0])]
        fail_at(
            path,
            raw,
            bad[:, LABEL_COLUMNS.index(column)],
            column,
            f"unknown severity {{value}}; expected one of {list(SEVERITIES)} or an empty cell",
        )
    order = np.argsort(ids, kind="stable")
    values = values[order]
    values[values == ""] = None
    return ids[order], values


def _load_coordinates(root: Path, studies: np.ndarray, series: pd.DataFrame) -> pd.DataFrame:
    """Validated coordinates: columns study_id, target, series_id, instance_number, x, y."""
    path = root / COORDINATES_CSV
    raw = read_csv(path, COORDINATE_COLUMNS)
    parsed = pd.DataFrame(index=raw.index)
    for c in ("study_id", "series_id", "instance_number"):
        parsed[c] = int_column(path, raw, c)
    choice_column(path, raw, "condition", CONDITION_NAMES)
    choice_column(path, raw, "level", LEVEL_NAMES)
    for c in ("x", "y"):
        parsed[c] = float_column(path, raw, c)
    parsed["condition"] = raw["condition"]
    parsed["level"] = raw["level"]
    unique_rows(path, raw, ("study_id", "condition", "level"), parsed)

    condition = raw["condition"].map({n: i for i, n in enumerate(CONDITION_NAMES)}).to_numpy(dtype=np.int64)
    level = raw["level"].map({n: i for i, n in enumerate(LEVEL_NAMES)}).to_numpy(dtype=np.int64)
    parsed["target"] = condition * len(LEVELS) + level

    fail_at(
        path,
        raw,
        ~np.isin(parsed["study_id"].to_numpy(), studies),
        "study_id",
        f"study {{value}} is not in {root / TRAIN_CSV}",
    )
    # A left merge keeps the coordinates' row order, so positions still match ``raw``.
    plane = parsed.merge(series, on=["study_id", "series_id"], how="left")["series_description"].to_numpy()
    described = series_descriptions_file(root, "train")
    fail_at(
        path,
        raw,
        pd.isna(plane),
        ("study_id", "series_id"),
        f"series {{value}} is not listed for this study in {described}",
    )
    expected = _TARGET_PLANE[parsed["target"].to_numpy()]
    wrong = plane != expected
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        fail_at(
            path,
            raw,
            wrong,
            ("condition", "series_id"),
            f"{{value}}: series is {str(plane[i])!r} in {described}, "
            f"but {raw['condition'].iloc[i]} is read on {str(expected[i])!r}",
        )
    return parsed[["study_id", "target", "series_id", "instance_number", "x", "y"]]


def _warn_ids(message: str, ids: np.ndarray) -> None:
    named = ", ".join(str(i) for i in ids[:_MAX_NAMED]) + (", ..." if len(ids) > _MAX_NAMED else "")
    warnings.warn(f"{message} ({len(ids)}): {named}", stacklevel=3)


def load_tables(root: str | os.PathLike, split: str = "train") -> pd.DataFrame:
    """The merged long frame: one row per (study, target), sorted by study_id then target.

    Columns (see ``FRAME_COLUMNS``): ``study_id`` int64; ``target`` int64 index into
    ``LABEL_COLUMNS``; ``column``, ``condition``, ``level`` keys; ``plane`` (series description the
    condition is read on); ``severity`` (str, None when the train.csv cell is empty or for test);
    ``label`` int64 (index into ``SEVERITIES``, -1 missing); ``series_id`` int64 (the labelled
    series if a coordinate exists, else the lowest series id of that plane, else -1);
    ``candidate_series`` (tuple of all series ids of that plane in the study); ``instance_number``,
    ``x``, ``y`` float64 (NaN without a coordinate).

    ``split="train"`` needs train.csv, train_label_coordinates.csv and
    train_series_descriptions.csv; ``split="test"`` reads only test_series_descriptions.csv.
    Raises :class:`SpineDataError` naming file, row and column of the first bad value.
    """
    root = Path(root)
    series = load_series_descriptions(root, split)
    if split == "train":
        studies, severity = _load_labels(root)
        coords = _load_coordinates(root, studies, series)
        described = series["study_id"].unique()
        unlabelled = np.setdiff1d(described, studies)
        if unlabelled.size:
            _warn_ids(
                f"studies in {series_descriptions_file(root, split)} but not in train.csv are ignored",
                unlabelled,
            )
        no_series = np.setdiff1d(studies, described)
        if no_series.size:
            _warn_ids("studies without series descriptions get series_id -1", no_series)
    else:
        studies = np.unique(series["study_id"].to_numpy())
        severity = np.full((len(studies), NUM_TARGETS), None, dtype=object)
        coords = pd.DataFrame(
            columns=["study_id", "target", "series_id", "instance_number", "x", "y"], dtype=np.int64
        )

    n = len(studies)
    frame = pd.DataFrame(
        {
            "study_id": np.repeat(studies.astype(np.int64), NUM_TARGETS),
            "target": np.tile(np.arange(NUM_TARGETS, dtype=np.int64), n),
            "column": np.tile(np.array(LABEL_COLUMNS), n),
            "condition": np.tile(_TARGET_CONDITION, n),
            "level": np.tile(_TARGET_LEVEL, n),
            "plane": np.tile(_TARGET_PLANE, n),
        }
    )
    # severity is [N, 25] in study-then-target order, the order of the rows above.
    severity = severity.reshape(-1)
    frame["severity"] = pd.Series(severity, dtype=object)
    label = np.full(len(frame), MISSING_LABEL, dtype=np.int64)
    for k, name in enumerate(SEVERITIES):
        label[severity == name] = k
    frame["label"] = label

    # Series ids of each (study, plane), ascending because ``series`` is sorted. ~6k rows: a dict is
    # simpler than a groupby and as fast.
    by_plane: dict[tuple[int, str], list[int]] = {}
    for study, plane, series_id in series[["study_id", "series_description", "series_id"]].itertuples(
        index=False, name=None
    ):
        by_plane.setdefault((study, plane), []).append(series_id)
    keys = frame[["study_id", "plane"]].itertuples(index=False, name=None)
    candidates = [tuple(by_plane.get(k, ())) for k in keys]
    lowest = np.array([c[0] if c else -1 for c in candidates], dtype=np.int64)

    merged = frame[["study_id", "target"]].merge(
        coords.rename(columns={"series_id": "labelled_series"}),
        on=["study_id", "target"],
        how="left",
        validate="one_to_one",
    )
    labelled = merged["labelled_series"].to_numpy(dtype=np.float64)
    frame["series_id"] = np.where(np.isnan(labelled), lowest, labelled).astype(np.int64)
    frame["candidate_series"] = pd.Series(candidates, dtype=object)
    for c in ("instance_number", "x", "y"):
        frame[c] = merged[c].to_numpy(dtype=np.float64)
    return frame


def to_hf_dataset(frame: pd.DataFrame) -> datasets.Dataset:
    """A :class:`datasets.Dataset` of a :func:`load_tables` frame.

    ``candidate_series`` becomes a list of int64, ``severity`` a nullable string; missing
    coordinates are nulls that read back as NaN. Extra columns keep their inferred types.
    """
    try:
        import datasets  # imported lazily: it is slow to import and only this function needs it
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "to_hf_dataset needs the Hugging Face 'datasets' package: pip install 'spinemm[datasets]'"
        ) from err
    import pyarrow as pa

    data = frame.reset_index(drop=True).copy()
    if "candidate_series" in data:
        data["candidate_series"] = [[int(s) for s in c] for c in data["candidate_series"]]
    if "severity" in data:
        data["severity"] = data["severity"].astype(object).where(data["severity"].notna(), None)
    features = datasets.Features.from_arrow_schema(pa.Schema.from_pandas(data, preserve_index=False))
    known = {
        **dict.fromkeys(("study_id", "target", "label", "series_id"), datasets.Value("int64")),
        **dict.fromkeys(("column", "condition", "level", "plane", "severity"), datasets.Value("string")),
        **dict.fromkeys(("instance_number", "x", "y"), datasets.Value("float64")),
        # Explicit, because a column of only empty lists would otherwise be typed null.
        "candidate_series": datasets.List(datasets.Value("int64")),
    }
    for name, feature in known.items():
        if name in features:
            features[name] = feature
    return datasets.Dataset.from_pandas(data, features=features, preserve_index=False)
