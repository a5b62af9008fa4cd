"""Train the locate stage (``spinemm.pipeline.LocateStage``) on the labelled sagittal slices.

Each training slice is shifted at random by up to ``locator.shift`` of its side (the label points
move with it) and its contrast bent by a random gamma, so the locator learns where a level sits
relative to the other discs, not where the training spines happened to lie in the field of view.
Training runs through the engine (:mod:`.stage_fit`); the epoch with the lowest validation loss is
kept and its validation errors are reported in millimetres. How far the foramina lie from the
midline (``LocatorConfig.foramen_mm``) and the subarticular zones from the canal
(``LocatorConfig.subarticular_mm``) are measured on the training labels, unless the config gives them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data.anatomy import label_patient_points, subarticular_offsets_mm
from ..data.level_slices import LevelSlices, foramen_offsets_mm
from ..errors import SpineModelError
from ..losses import heatmap_loss
from ..models.config import LocatorConfig, config_from_dict
from ..models.locator import decode_heatmaps
from ..pipeline.locate import LocateStage
from .stage_fit import epoch_generator, fit_stage

# Weight of heatmap_loss's L1 term (normalised units, ~0.01) beside its cross-entropy over cells.
COORD_WEIGHT = 2.0


class LocatorSamples(Dataset):
    """Items of :class:`~spinemm.data.level_slices.LevelSlices`, shifted and gamma-bent:
    ``{"slices", "points", "mask", "plane"}``. Each epoch's augmentations are drawn at once by
    :meth:`set_epoch` from a generator seeded with ``(seed, epoch)`` (never the global RNG, so a
    resumed run repeats), and a batch is transformed in one call (``__getitems__``)."""

    def __init__(self, slices: LevelSlices, shift: float, seed: int = 0) -> None:
        self.slices, self.shift, self.seed = slices, float(shift), int(seed)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.move, self.gamma = draw_augment(len(self.slices), self.shift, epoch_generator(self.seed, self.epoch))

    def __len__(self) -> int:
        return len(self.slices)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch, already stacked (``stage_fit.batch_collate`` passes it through)."""
        data, index = self.slices, torch.as_tensor(indices, dtype=torch.long)
        slices, points, mask = apply_augment(data.slices[index].float(), data.points[index], data.mask[index],
                                             self.move[index], self.gamma[index])
        return {"slices": slices, "points": points, "mask": mask, "plane": data.planes[index]}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([int(index)]).items()}


def draw_augment(n: int, shift: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random shifts ``[n, 2]`` (up to ``shift`` of the side) and gammas ``[n]``."""
    move = (torch.rand(n, 2, generator=generator) - 0.5) * 2 * shift  # in fractions of the side
    gamma = torch.exp(0.3 * torch.randn(n, generator=generator))
    return move, gamma


def apply_augment(slices: torch.Tensor, points: torch.Tensor, mask: torch.Tensor, move: torch.Tensor,
                  gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shift each slice by ``move`` (points follow; a level pushed out of view is masked) and raise
    its intensities to ``gamma``."""
    n = slices.shape[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = -2 * move  # output pixel p reads input p - move
    grid = F.affine_grid(theta, list(slices.shape), align_corners=False)
    slices = F.grid_sample(slices, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    slices = slices.clamp(0, 1) ** gamma[:, None, None, None]
    points = points + move[:, None, :]
    mask = mask & ((points >= 0) & (points < 1)).all(-1)
    return slices, points, mask


def augment(slices: torch.Tensor, points: torch.Tensor, mask: torch.Tensor, shift: float,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`draw_augment` then :func:`apply_augment` on a batch."""
    return apply_augment(slices, points, mask, *draw_augment(slices.shape[0], shift, generator))


def locator_loss(logits: torch.Tensor, points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return heatmap_loss(logits, points, mask, coord_weight=COORD_WEIGHT)


def locate_step(stage: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """batch -> (heatmap loss, {}) for the engine."""
    return locator_loss(stage(batch["slices"], batch["plane"]), batch["points"], batch["mask"]), {}


@torch.no_grad()
def evaluate_locator(stage: torch.nn.Module, slices: LevelSlices, batch_size: int = 64) -> dict[str, float]:
    """Validation loss (``score``), median in-plane error (mm) and share of labelled levels within
    5 mm; NaN without labelled slices."""
    if len(slices) == 0 or not bool(slices.mask.any()):
        return {"score": math.nan, "val_median_mm": math.nan, "val_within_5mm": math.nan}
    was_training = stage.training
    stage.eval()
    device = next(stage.parameters()).device
    losses, errors = [], []
    for start in range(0, len(slices), batch_size):
        part = slice(start, start + batch_size)
        logits = stage(slices.slices[part].float().to(device), slices.planes[part].to(device)).float().cpu()
        mask = slices.mask[part]
        losses.append(float(locator_loss(logits, slices.points[part], mask)) * int(mask.sum()))
        xy, _ = decode_heatmaps(logits)
        mm = ((xy - slices.points[part]) * slices.mm_per_unit[part][:, None, :]).norm(dim=-1)
        errors.append(mm[mask])
    stage.train(was_training)
    errors = torch.cat(errors)
    return {"score": sum(losses) / int(slices.mask.sum()), "val_median_mm": float(errors.median()),
            "val_within_5mm": float((errors <= 5).float().mean())}


def train_locate(config: dict[str, Any], run: Any, output_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Train a fresh locate stage (``locator.model``: :class:`LocatorConfig` fields) on ``run``'s
    studies; returns ``{"stage", "state", "history", "metrics"}`` (``stage`` None if stopped early)."""
    options = config["locator"]
    stage = LocateStage(config_from_dict(LocatorConfig, options["model"] or {}, "locator.model."))
    cfg = stage.config
    data_args = {"size": cfg.size, "context": cfg.context, "progress": progress, "store": run.store}
    train_set = LevelSlices(run.root, run.frame, run.train_ids, **data_args)
    val_set = LevelSlices(run.root, run.frame, run.val_ids, **data_args)
    if len(train_set) == 0:
        raise SpineModelError(f"no labelled sagittal coordinates in the {len(run.train_ids)} training studies "
                              f"under {run.root}")
    if cfg.foramen_mm is None:  # not given: measured on the training labels
        cfg.foramen_mm = foramen_offsets_mm(train_set.patient_x)
    if cfg.subarticular_mm is None:  # likewise (reads the labelled axial series, which grading reads next)
        cfg.subarticular_mm = subarticular_offsets_mm(label_patient_points(run.store, run.frame, run.train_ids))
    samples = LocatorSamples(train_set, float(options["shift"]), int(config["train"]["seed"]))
    state, metrics = fit_stage(config, "locator", stage, samples, locate_step,
                               lambda m: evaluate_locator(m, val_set), output_dir)
    best = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    return {"stage": None if state.stopped else stage, "state": state, "history": state.history,
            "metrics": {"val_loss": best.get("score", math.nan), "val_median_mm": best.get("val_median_mm", math.nan),
                        "val_within_5mm": best.get("val_within_5mm", math.nan), "foramen_mm": cfg.foramen_mm,
                        "subarticular_mm": cfg.subarticular_mm,
                        "train_slices": len(train_set),
                        "val_slices": len(val_set)}}
