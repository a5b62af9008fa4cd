"""Stage "locate": the level locator sharpens the first stage's points before anything is graded.

- Sagittal findings (spinal canal, neural foramina): :class:`~spinemm.models.locator.LevelLocator`
  reads the slice the first stage chose and gives each level's x, y; a foramen's level is held near
  the height of the same level's canal point (a Gaussian prior, ``prior_mm``), because the foramina
  sit beside their disc and the canal's level is the surer read.
- Axial findings (subarticular): the axial slice is the one through the located canal point of the
  same level, carried into the axial series by the DICOM geometry of both (``map_point``). Rows whose
  point falls outside the axial stack keep their slice, as do rows without a located canal point.

The sagittal slice and the in-plane axial point stay the first stage's; the grade stage's offset
head re-centres them afterwards. A series that cannot be read leaves its findings as they were,
with a warning naming it.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from ..constants import CONDITION_PLANE, CONDITIONS, LEVELS, PLANES
from ..data.level_slices import locator_input
from ..data.series import Series, map_point
from ..data.store import SeriesStore
from ..models.config import LocatorConfig
from ..models.locator import LevelLocator, decode_heatmaps
from .findings import Findings

__all__ = ["LocateStage", "axial_slices_from_canal"]

_CONDITION = np.array([CONDITIONS[t // len(LEVELS)] for t in range(len(CONDITIONS) * len(LEVELS))])
_PLANE = np.array([CONDITION_PLANE[c] for c in _CONDITION])


class LocateStage(torch.nn.Module):
    """The level locator as a pipeline stage (config: :class:`~spinemm.models.config.LocatorConfig`)."""

    name = "locate"

    def __init__(self, config: LocatorConfig | None = None) -> None:
        super().__init__()
        self.config = config or LocatorConfig()
        self.locator = LevelLocator(self.config)

    def config_dict(self) -> dict:
        return asdict(self.config)

    def compile_models(self, **options) -> None:
        """The locator under ``torch.compile(fullgraph=True)`` (``nn.Module.compile``: in place)."""
        self.locator.compile(fullgraph=True, **options)

    def forward(self, slices: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        """The locator's heatmap logits (``LevelLocator``) for training and evaluation."""
        return self.locator(slices, plane)

    @torch.no_grad()
    def run(self, findings: Findings, store: SeriesStore) -> Findings:
        """A new record: sagittal findings moved to the locator's points (x, y, confidence), axial
        ones to the axial slice through their level's canal point (instance_number)."""
        device = next(self.locator.parameters()).device
        was_training = self.locator.training
        self.locator.eval()
        out = findings.replace()
        try:
            for study_id, rows in out.by_study(out.located):
                targets = out.target[rows]
                canal = rows[_CONDITION[targets] == "spinal_canal_stenosis"]
                self._locate_sagittal(out, canal, store, study_id, device)
                foramina = rows[_PLANE[targets] == "Sagittal T1"]
                self._locate_sagittal(out, foramina, store, study_id, device, anchors=canal)
                _axial_from_canal(out, rows, store, study_id)
        finally:
            self.locator.train(was_training)
        return out

    def _locate_sagittal(self, out: Findings, rows: np.ndarray, store: SeriesStore, study_id: int,
                         device: torch.device, anchors: np.ndarray | None = None) -> None:
        """Run the locator once per (series, instance) of ``rows``; write each row's level point.
        With ``anchors`` (located canal rows), weigh each level's heatmap by :func:`_height_prior`."""
        cfg = self.config
        inputs, groups, planes, found_series = [], [], [], []
        keys = np.stack([out.series_id[rows], out.instance_number[rows]], axis=1) if len(rows) else np.empty((0, 2))
        for key in np.unique(keys, axis=0):
            group = rows[(keys == key).all(axis=1)]
            series = store.find(study_id, int(key[0]), "located")
            index = None if series is None else series.instance_to_index.get(int(key[1]))
            if index is None:
                continue
            inputs.append(locator_input(torch.from_numpy(series.volume), index, cfg.context, cfg.size))
            groups.append(group)
            planes.append(PLANES.index(_PLANE[out.target[group[0]]]))
            found_series.append(series)
        if not inputs:
            return
        logits = self.locator(torch.stack(inputs).to(device), torch.tensor(planes, device=device)).float().cpu()
        if anchors is not None and len(anchors) and cfg.prior_mm:
            logits = logits + torch.stack([_height_prior(out, anchors, store, study_id, target, logits.shape[-1],
                                                         cfg.prior_mm) for target in found_series])
        xy, confidence = decode_heatmaps(logits)
        for group, series, points, conf in zip(groups, found_series, xy.numpy(), confidence.numpy(), strict=True):
            height, width = series.volume.shape[-2:]
            level = out.target[group] % len(LEVELS)
            out.x[group] = points[level, 0] * width
            out.y[group] = points[level, 1] * height
            out.confidence[group] = conf[level]


def _height_prior(out: Findings, anchors: np.ndarray, store: SeriesStore, study_id: int, target: Series, grid: int,
                  sd_mm: float) -> torch.Tensor:
    """Log-weights [5, grid, grid] over ``target``'s heatmap cells: a Gaussian in the row direction
    around where each level's canal point lies in ``target`` (0 for a level without one)."""
    prior = torch.zeros(len(LEVELS), grid, grid)
    height = target.volume.shape[-2]
    rows = (torch.arange(grid) + 0.5) / grid * height  # cell centres, in pixels
    for anchor in anchors:
        source = store.find(study_id, int(out.series_id[anchor]), "located")
        k = None if source is None else source.instance_to_index.get(int(out.instance_number[anchor]))
        if k is None:
            continue
        _, y, _ = map_point(source, float(out.x[anchor]), float(out.y[anchor]), k, target)
        sd_rows = sd_mm / target.pixel_spacing[0]
        prior[out.target[anchor] % len(LEVELS)] = (-0.5 * ((rows - y) / sd_rows) ** 2)[:, None]
    return prior


def axial_slices_from_canal(findings: Findings, store: SeriesStore) -> Findings:
    """A new record whose axial findings sit on the axial slice through the spinal canal point of
    their level (the geometry step of :class:`LocateStage`, on the canal points as given)."""
    out = findings.replace()
    for study_id, rows in out.by_study(out.located):
        _axial_from_canal(out, rows, store, study_id)
    return out


def _axial_from_canal(out: Findings, rows: np.ndarray, store: SeriesStore, study_id: int) -> None:
    """Set each axial row's instance to the axial slice through its level's (located) canal point."""
    targets = out.target[rows]
    canal = {int(out.target[r]) % len(LEVELS): r for r in rows[_CONDITION[targets] == "spinal_canal_stenosis"]}
    for row in rows[_PLANE[targets] == "Axial T2"]:
        point = canal.get(int(out.target[row]) % len(LEVELS))
        if point is None:
            continue
        sagittal = store.find(study_id, int(out.series_id[point]), "located")
        axial = store.find(study_id, int(out.series_id[row]), "located")
        k = None if sagittal is None else sagittal.instance_to_index.get(int(out.instance_number[point]))
        if k is None or axial is None:
            continue
        _, _, slice_k = map_point(sagittal, float(out.x[point]), float(out.y[point]), k, axial)
        index = int(np.rint(slice_k))
        if 0 <= index < len(axial.instance_numbers):
            out.instance_number[row] = int(axial.instance_numbers[index])
