"""Where the subarticular zones lie relative to the spinal canal, measured on training labels.

A subarticular zone sits beside the canal at its own disc level, a few millimetres to its side: on
the phantom 7-7.5 mm to the side and 2.7 mm anterior, with a spread of 1.3 mm between studies,
where a first stage's in-plane guess on a low-resolution axial stack was off by a median of 6.6-10.4 mm
(RESULTS.md, "Quality over seeds"). So the locate stage puts each subarticular finding at its
level's located canal point plus the median offset the training labels show
(``LocatorConfig.subarticular_mm``), and the grade stage's offset head re-centres it from there.

Offsets are in DICOM patient coordinates (LPS: +x the patient's left, +y posterior, +z superior),
so they mean the same thing in every series, whatever its orientation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..constants import CANAL, CONDITION_SIDE, LEVELS, METRIC_GROUPS
from .roi import label_location
from .store import SeriesStore

__all__ = ["SUBARTICULAR", "label_patient_points", "subarticular_offsets_mm", "subarticular_offset"]

#: The subarticular conditions, left then right: the order of ``subarticular_mm``'s two halves.
SUBARTICULAR: tuple[str, ...] = tuple(sorted(METRIC_GROUPS["subarticular"], key=lambda c: -CONDITION_SIDE[c]))
AXES = ("patient_x", "patient_y", "patient_z")


def label_patient_points(store: SeriesStore, frame: pd.DataFrame, study_ids: Sequence[int],
                         conditions: Sequence[str] = (CANAL, *SUBARTICULAR)) -> pd.DataFrame:
    """Every labelled point of ``conditions`` in ``study_ids`` in patient mm: ``study_id, condition,
    level, patient_x, patient_y, patient_z``. Each point is read in the pixels of the slice it names
    (:func:`~spinemm.data.roi.label_location`: a point off its slice is a named error)."""
    rows = frame[frame["study_id"].isin([int(s) for s in study_ids]) & frame["condition"].isin(conditions)
                 & frame["instance_number"].notna()]
    points = []
    for (study_id, series_id), group in rows.groupby(["study_id", "series_id"], sort=True):
        series, path = store.get(int(study_id), int(series_id)), store.path(int(study_id), int(series_id))
        for row in group.itertuples(index=False):
            index, x, y = label_location(series, path, row.instance_number, int(study_id),
                                         f"{row.condition} {row.level}", row.x, row.y)
            patient = series.voxel_to_patient(np.array([[x, y, index]], dtype=np.float64))[0]
            points.append((int(study_id), row.condition, row.level, *map(float, patient)))
    return pd.DataFrame(points, columns=["study_id", "condition", "level", *AXES])


def subarticular_offsets_mm(points: pd.DataFrame) -> tuple[float, ...] | None:
    """From :func:`label_patient_points`: per side (left, right) and level (``LEVELS`` order), the
    median offset (x, y, z in mm) of a labelled subarticular point from its study's canal point of
    the same level; 30 numbers, flat (:func:`subarticular_offset` reads them). A level without
    labelled pairs takes its side's median over all levels; None when a side has no pair at all."""
    canal = points[points.condition == CANAL].groupby(["study_id", "level"])[list(AXES)].median()
    offsets = []
    for condition in SUBARTICULAR:
        zone = points[points.condition == condition].groupby(["study_id", "level"])[list(AXES)].median()
        paired = (zone - canal).dropna()
        if paired.empty:
            return None
        overall = paired.median()
        by_level = paired.groupby(level="level").median()
        for level in LEVELS:
            offsets += list(by_level.loc[level] if level in by_level.index else overall)
    return tuple(round(float(v), 3) for v in offsets)


def subarticular_offset(offsets: Sequence[float], condition: str, level: int) -> np.ndarray:
    """``[3]``: the offset (patient mm) of ``condition``'s zone from the canal at level index ``level``."""
    side = SUBARTICULAR.index(condition)
    start = (side * len(LEVELS) + int(level)) * 3
    return np.asarray(offsets[start:start + 3], dtype=np.float64)
