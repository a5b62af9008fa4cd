"""The record stages pass each other: where every (study, condition, level) finding is.

A :class:`Findings` is a few aligned numpy arrays, one entry per (study, label column), so a stage
returns a new record instead of editing a DataFrame in place; pandas appears only at the CSV edge
(:meth:`Findings.to_frame`, :meth:`Findings.from_frame`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..constants import CONDITIONS, LEVELS, target_index
from ..data.store import SeriesStore
from ..errors import SpineDataError

__all__ = ["Findings", "LOCATION_COLUMNS", "slice_points"]

#: Columns of the location frame (``locations.csv``).
LOCATION_COLUMNS = ("study_id", "condition", "level", "series_id", "instance_number", "x", "y", "confidence")


@dataclass
class Findings:
    """Aligned arrays of length N: where each finding is, in the original pixels of its series (its
    common grid: the size most of its slices are stored at; :func:`slice_points` gives a point in
    the pixels of its own slice where that slice was stored at another size).

    ``series_id`` is -1 where the study has no series for the finding's plane, ``instance_number``
    -1 and ``x``/``y`` NaN where it was not located.
    """

    study_id: np.ndarray  # int64 [N]
    target: np.ndarray  # int64 [N]: column of LABEL_COLUMNS (condition-major, then level)
    series_id: np.ndarray  # int64 [N]
    instance_number: np.ndarray  # int64 [N]
    x: np.ndarray  # float64 [N]: column, original pixels
    y: np.ndarray  # float64 [N]: row, original pixels
    confidence: np.ndarray  # float64 [N]: the stage's confidence in the point, in [0, 1]

    def __post_init__(self) -> None:
        for field, dtype in (("study_id", np.int64), ("target", np.int64), ("series_id", np.int64),
                             ("instance_number", np.int64), ("x", np.float64), ("y", np.float64),
                             ("confidence", np.float64)):
            setattr(self, field, np.asarray(getattr(self, field), dtype=dtype).reshape(-1))
        n = len(self.study_id)
        if any(len(getattr(self, f.name)) != n for f in dataclasses.fields(self)):
            raise ValueError("Findings arrays must all have the same length")

    def __len__(self) -> int:
        return len(self.study_id)

    @property
    def located(self) -> np.ndarray:
        """bool [N]: the finding has a series, a slice and a point."""
        return (self.series_id >= 0) & (self.instance_number >= 0) & np.isfinite(self.x) & np.isfinite(self.y)

    def replace(self, rows: np.ndarray | None = None, **values: np.ndarray) -> Findings:
        """A copy with ``values`` (arrays, or scalars) written at ``rows`` (an index or mask; all rows
        when None)."""
        out = Findings(**{f.name: getattr(self, f.name).copy() for f in dataclasses.fields(self)})
        where = slice(None) if rows is None else rows
        for name, value in values.items():
            getattr(out, name)[where] = value
        return out

    def by_study(self, rows: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(study_id, row indices)`` for each study among ``rows`` (a mask; default all), in order
        of first appearance."""
        index = np.arange(len(self)) if rows is None else np.flatnonzero(rows)
        studies = self.study_id[index]
        _, first = np.unique(studies, return_index=True)
        for study in studies[np.sort(first)]:
            yield int(study), index[studies == study]

    @classmethod
    def concat(cls, parts: list[Findings]) -> Findings:
        if not parts:
            return cls(*(np.empty(0) for _ in dataclasses.fields(cls)))
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)})

    def to_frame(self) -> pd.DataFrame:
        """The location frame: :data:`LOCATION_COLUMNS`, condition and level by name, NaN (``<NA>``
        for instance_number) where a finding was not located."""
        located = self.instance_number >= 0
        instance = pd.array(self.instance_number, dtype="Int64")
        instance[~located] = pd.NA
        return pd.DataFrame({
            "study_id": self.study_id,
            "condition": [CONDITIONS[t // len(LEVELS)] for t in self.target],
            "level": [LEVELS[t % len(LEVELS)] for t in self.target],
            "series_id": self.series_id,
            "instance_number": instance,
            "x": np.where(located, self.x, np.nan),
            "y": np.where(located, self.y, np.nan),
            "confidence": self.confidence,
        })

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Findings:
        """Inverse of :meth:`to_frame` (a frame with :data:`LOCATION_COLUMNS`)."""
        instance = frame["instance_number"].astype("Float64").fillna(-1).to_numpy(dtype=np.float64)
        return cls(
            study_id=frame["study_id"].to_numpy(),
            target=[target_index(c, lv) for c, lv in zip(frame["condition"], frame["level"], strict=True)],
            series_id=frame["series_id"].to_numpy(),
            instance_number=instance.astype(np.int64),
            x=frame["x"].to_numpy(dtype=np.float64),
            y=frame["y"].to_numpy(dtype=np.float64),
            confidence=frame["confidence"].to_numpy(dtype=np.float64) if "confidence" in frame else np.zeros(len(frame)),
        )


def slice_points(findings: Findings, store: SeriesStore) -> np.ndarray:
    """``[N, 2]``: each finding's ``(x, y)`` in the pixels of its own slice as stored
    (:meth:`~spinemm.data.series.Series.to_slice_pixels`), as label coordinates are; the grid's point
    where the slice has the series' size, or its series cannot be read (its stage warned)."""
    xy = np.stack([findings.x, findings.y], axis=1)
    for study_id, rows in findings.by_study(findings.located):
        for series_id in np.unique(findings.series_id[rows]):
            try:
                series = store.get(study_id, int(series_id))
            except SpineDataError:
                continue
            if series.source_shapes is None:  # every slice at the grid's size
                continue
            for row in rows[findings.series_id[rows] == series_id]:
                index = series.instance_to_index.get(int(findings.instance_number[row]))
                if index is not None:
                    xy[row] = series.to_slice_pixels(index, xy[row, 0], xy[row, 1])
    return xy
