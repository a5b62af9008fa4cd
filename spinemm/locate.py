"""Second-stage localisation: sharpen the fusion model's location frame before the grader reads it.

- Sagittal findings (spinal canal, neural foramina): the model's level locator
  (``spinemm.models.locator``) reads the slice the fusion model chose and gives each level's x, y;
  a foramen's level is held near the height of the same level's canal point.
- Axial findings (subarticular): the axial slice is where the study's located spinal canal point
  of the same level falls in the axial series, through the DICOM geometry of both series
  (``map_point``). The fusion model picks the axial slice among a few resampled ones, so it is
  often a level off; the sagittal canal point fixes the level, and the geometry the slice. Rows
  whose point falls outside the axial stack (a stack that does not cover that level) keep the
  fusion model's slice, as do rows without a located canal point.

The sagittal slice and the in-plane axial point stay the fusion model's; the grader's offset head
re-centres them afterwards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .constants import CONDITION_PLANE, LEVELS, PLANES
from .data.level_slices import locator_input
from .data.roi import StudySeries
from .data.series import Series, map_point
from .errors import SpineModelError
from .models.locator import decode_heatmaps

__all__ = ["locate_levels", "axial_slices_from_canal"]

CANAL = "spinal_canal_stenosis"


@torch.no_grad()
def locate_levels(model: torch.nn.Module, root: str | Path, split: str, locations: pd.DataFrame, *,
                  device: torch.device | str | None = None, prior_mm: float | None = 12.0,
                  progress: bool = True) -> pd.DataFrame:
    """A copy of ``locations`` (:func:`~spinemm.inference.locations_to_pixels`) with sagittal rows
    moved to the locator's points (x, y, confidence) and axial rows to the axial slice through the
    canal point of their level (instance_number). Needs ``model.locator`` (``add_locator``, trained
    by ``train_grader``). A series that cannot be read is left as it was, with a warning naming it.

    ``prior_mm``: the canal is located first; each foraminal level's heatmap is then weighed by a
    Gaussian (this sd, in mm) around the height of its level's canal point carried into the T1
    series, because the foramina sit beside their disc and the canal's level is the surer read
    (``None``: no prior).
    """
    locator = getattr(model, "locator", None)
    if locator is None:
        raise SpineModelError("this model has no level locator; call add_locator() and train it (train_grader)")
    device = torch.device(device) if device is not None else next(locator.parameters()).device
    out = locations.copy()
    located = out[(out["series_id"] >= 0) & out["instance_number"].notna()]
    plane = located["condition"].map(CONDITION_PLANE)
    was_training = locator.training
    locator.eval()
    try:
        for study_id, study in tqdm(located.groupby("study_id", sort=False), desc="level locator", unit="study",
                                    disable=not progress):
            series = StudySeries(root, split, study_id, "located")
            canal = study[study["condition"] == CANAL]
            _locate_sagittal(locator, canal, series, out, device)
            anchors = out.loc[canal.index] if prior_mm else None
            foramina = study[(plane[study.index] == "Sagittal T1")]
            _locate_sagittal(locator, foramina, series, out, device, anchors, prior_mm)
            _axial_from_canal(out.loc[study.index], series, out)
    finally:
        locator.train(was_training)
    return out


def _locate_sagittal(locator: torch.nn.Module, rows: pd.DataFrame, series: StudySeries, out: pd.DataFrame,
                     device: torch.device, anchors: pd.DataFrame | None = None, prior_mm: float | None = None) -> None:
    """Run the locator once per (series, instance) of ``rows``; write each row's level point.
    With ``anchors`` (located canal rows), weigh each level's heatmap by :func:`_height_prior`."""
    cfg = locator.config
    inputs, groups, planes, found_series = [], [], [], []
    for (series_id, instance), group in rows.groupby(["series_id", "instance_number"], sort=False):
        found = series(series_id)
        index = None if found is None else found.instance_to_index.get(int(instance))
        if index is None:
            continue
        inputs.append(locator_input(series.volume(series_id), index, cfg.context, cfg.size))
        groups.append(group)
        planes.append(PLANES.index(CONDITION_PLANE[group["condition"].iloc[0]]))
        found_series.append(found)
    if not inputs:
        return
    logits = locator(torch.stack(inputs).to(device), torch.tensor(planes, device=device)).float().cpu()
    if anchors is not None and len(anchors):
        logits = logits + torch.stack([_height_prior(anchors, series, target, logits.shape[-1], prior_mm)
                                       for target in found_series])
    xy, confidence = decode_heatmaps(logits)
    for group, found, points, conf in zip(groups, found_series, xy.numpy(), confidence.numpy(), strict=True):
        height, width = found.volume.shape[-2:]
        level = group["level"].map(LEVELS.index).to_numpy()
        out.loc[group.index, "x"] = points[level, 0] * width
        out.loc[group.index, "y"] = points[level, 1] * height
        out.loc[group.index, "confidence"] = conf[level]


def _height_prior(anchors: pd.DataFrame, series: StudySeries, target: Series, grid: int,
                  sd_mm: float) -> torch.Tensor:
    """Log-weights [5, grid, grid] over ``target``'s heatmap cells: a Gaussian in the row direction
    around where each level's canal point lies in ``target`` (0 for a level without one)."""
    prior = torch.zeros(len(LEVELS), grid, grid)
    height = target.volume.shape[-2]
    rows = (torch.arange(grid) + 0.5) / grid * height  # cell centres, in pixels
    for anchor in anchors.itertuples():
        source = series(anchor.series_id)
        k = None if source is None else source.instance_to_index.get(int(anchor.instance_number))
        if k is None:
            continue
        _, y, _ = map_point(source, float(anchor.x), float(anchor.y), k, target)
        sd_rows = sd_mm / target.pixel_spacing[0]
        prior[LEVELS.index(anchor.level)] = (-0.5 * ((rows - y) / sd_rows) ** 2)[:, None]
    return prior


def axial_slices_from_canal(root: str | Path, split: str, locations: pd.DataFrame, *,
                            progress: bool = False) -> pd.DataFrame:
    """A copy of ``locations`` whose axial rows sit on the axial slice through the spinal canal
    point of their level (the geometry step of :func:`locate_levels`, on the canal points as given)."""
    out = locations.copy()
    located = out[(out["series_id"] >= 0) & out["instance_number"].notna()]
    for study_id, study in tqdm(located.groupby("study_id", sort=False), desc="axial slices", unit="study",
                                disable=not progress):
        _axial_from_canal(study, StudySeries(root, split, study_id, "located"), out)
    return out


def _axial_from_canal(study: pd.DataFrame, series: StudySeries, out: pd.DataFrame) -> None:
    """Set each axial row's instance to the axial slice through its level's (located) canal point."""
    canal = study[study["condition"] == CANAL].set_index("level")
    axial = study[study["condition"].map(CONDITION_PLANE) == "Axial T2"]
    for row in axial.itertuples():
        if row.level not in canal.index:
            continue
        point = canal.loc[row.level]
        sagittal, target = series(point["series_id"]), series(row.series_id)
        k = None if sagittal is None else sagittal.instance_to_index.get(int(point["instance_number"]))
        if k is None or target is None:
            continue
        _, _, slice_k = map_point(sagittal, float(point["x"]), float(point["y"]), k, target)
        index = int(np.rint(slice_k))
        if 0 <= index < len(target.instance_numbers):
            out.loc[row.Index, "instance_number"] = int(target.instance_numbers[index])
