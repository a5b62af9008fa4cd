"""Whole sagittal slices with the disc-level points labelled on them: the level locator's input.

- :func:`locator_input`: one slice and its neighbours, resampled to a square (``LevelLocator``'s
  input, the same at training and inference).
- :class:`LevelSlices`: every labelled sagittal slice of some studies, with the (x, y) of each level
  labelled on it.
- :func:`foramen_offsets_mm`: how far the labelled foramina lie from the midline, per level.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..constants import CANAL, CONDITION_PLANE, FORAMINA, LEVELS, PLANES
from .roi import label_location, labelled_volumes
from .store import SeriesStore

__all__ = ["locator_input", "square_frame", "LevelSlices", "foramen_offsets_mm"]

#: Conditions read on a sagittal series, whose points the locator learns.
SAGITTAL_CONDITIONS: tuple[str, ...] = tuple(c for c, plane in CONDITION_PLANE.items() if plane.startswith("Sagittal"))


def square_frame(height: int, width: int) -> tuple[int, int, int]:
    """``(side, top, left)``: a ``height x width`` slice is centred in a ``side`` square (zeros
    around it) before it is resampled, so a non-square matrix keeps its anatomy's proportions.
    Pixel (x, y) of the slice lies at ``((x + left) / side, (y + top) / side)`` of the square."""
    side = max(height, width)
    return side, (side - height) // 2, (side - width) // 2


def locator_input(volume: torch.Tensor, index: int, context: int, size: int) -> torch.Tensor:
    """Slice ``index`` of ``volume [S, H, W]`` (in [0, 1]) with ``context`` neighbours on each side
    (clamped to the stack), centred in its :func:`square_frame` and resampled to ``[1 + 2 *
    context, size, size]``. The whole field of view is kept."""
    depth, height, width = volume.shape
    slices = np.clip(int(index) + np.arange(-context, context + 1), 0, depth - 1)
    image = volume[torch.from_numpy(slices)].float()[None]
    side, top, left = square_frame(height, width)
    if side != height or side != width:
        image = F.pad(image, (left, side - width - left, top, side - height - top))
    antialias = side > size  # average, not skip, pixels when shrinking a 512 slice
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)[0]


class LevelSlices:
    """Every labelled sagittal slice of ``study_ids``: one sample per (study, condition, series,
    instance), holding the levels labelled on that slice.

    Attributes: ``slices [N, 1 + 2 * context, size, size]`` float16, ``points [N, 5, 2]`` (each
    level's x, y as fractions of the slice's :func:`square_frame`, 0 where unlabelled), ``mask [N,
    5]`` (level labelled), ``planes [N]`` (the series' index in ``PLANES``) and ``mm_per_unit [N,
    2]`` (the square's side in mm across x and y, to turn normalised errors into millimetres);
    ``patient_x``: a frame of every labelled point's patient x in mm (study_id, condition, level,
    patient_x), for :func:`foramen_offsets_mm`. Series paths come from validated integer ids.
    """

    def __init__(self, root: str | Path, frame: pd.DataFrame, study_ids: Sequence[int], *, size: int,
                 context: int = 1, split: str = "train", progress: bool = True,
                 store: SeriesStore | None = None) -> None:
        rows = frame[frame["study_id"].isin([int(s) for s in study_ids])
                     & frame["condition"].isin(SAGITTAL_CONDITIONS) & frame["instance_number"].notna()]
        slices, points, masks, planes, mm, patient_x = [], [], [], [], [], []
        store = store if store is not None else SeriesStore(root, split)
        for study_id, path, series, volume, group in labelled_volumes(store, rows, "locator slices", progress):
            side, top, left = square_frame(*volume.shape[-2:])
            for (condition, instance), labelled in group.groupby(["condition", "instance_number"], sort=True):
                point, mask = np.zeros((len(LEVELS), 2), np.float32), np.zeros(len(LEVELS), bool)
                for row in labelled.itertuples(index=False):  # every point on its slice, or a named error
                    index, x, y = label_location(series, path, instance, study_id, f"{condition} {row.level}",
                                                 row.x, row.y)
                    level = LEVELS.index(row.level)
                    point[level], mask[level] = ((x + left) / side, (y + top) / side), True
                    x_mm = series.voxel_to_patient(np.array([[x, y, index]], dtype=np.float64))[0, 0]
                    patient_x.append((study_id, condition, row.level, float(x_mm)))
                slices.append(locator_input(volume, index, context, size).to(torch.float16))
                points.append(point)
                masks.append(mask)
                planes.append(PLANES.index(CONDITION_PLANE[condition]))
                mm.append((side * series.pixel_spacing[1], side * series.pixel_spacing[0]))
        channels = 1 + 2 * int(context)
        self.slices = torch.stack(slices) if slices else torch.zeros(0, channels, size, size, dtype=torch.float16)
        self.points = torch.tensor(np.array(points, dtype=np.float32).reshape(-1, len(LEVELS), 2))
        self.mask = torch.tensor(np.array(masks, dtype=bool).reshape(-1, len(LEVELS)))
        self.planes = torch.tensor(planes, dtype=torch.long)
        self.mm_per_unit = torch.tensor(np.array(mm, dtype=np.float32).reshape(-1, 2))
        self.patient_x = pd.DataFrame(patient_x, columns=["study_id", "condition", "level", "patient_x"])

    def __len__(self) -> int:
        return int(self.planes.shape[0])


def foramen_offsets_mm(patient_x: pd.DataFrame) -> tuple[float, ...] | None:
    """Per level (``LEVELS`` order), the median distance in patient x (left-right, mm) between a
    labelled neural foramen and its study's midline, the median x of the study's canal points: the
    :class:`~spinemm.models.config.LocatorConfig` ``foramen_mm`` that places foramina by anatomy.
    A level without labelled pairs takes the median of all levels; None without any (no study has
    both a canal and a foramen label)."""
    canal = patient_x[patient_x.condition == CANAL].groupby("study_id").patient_x.median()
    foramina = patient_x[patient_x.condition.isin(FORAMINA)]
    distance = (foramina.patient_x - foramina.study_id.map(canal)).abs()
    known = distance.notna()
    if not known.any():
        return None
    by_level = distance[known].groupby(foramina.level[known]).median()
    overall = float(distance[known].median())
    return tuple(float(by_level.get(level, overall)) for level in LEVELS)
