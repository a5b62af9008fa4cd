"""Train the level locator (``spinemm.models.locator``) on the labelled sagittal slices.

``fit_locator`` is the first step of ``train_grader`` (the second stage) when ``locator.epochs``
is above 0: the grader's study context is fitted at the locations the two stages will predict, so
the locator must be ready first. Each training slice is shifted at random by up to
``locator.shift`` of its side (the label points move with it) and its contrast bent by a random
gamma, so the locator learns where a level sits relative to the other discs, not where the
training spines happened to lie in the field of view. The epoch with the lowest validation loss is
kept; its validation errors are reported in millimetres.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..losses import heatmap_loss
from .common import epoch_shard
from .engine import make_scheduler

# Weight of heatmap_loss's L1 term (normalised units, ~0.01) beside its cross-entropy over cells.
COORD_WEIGHT = 2.0


def fit_locator(model: torch.nn.Module, root: Path, frame: pd.DataFrame, train_ids: list[int], val_ids: list[int],
                options: dict[str, Any], accelerator: Any, seed: int, progress: bool = True) -> dict[str, Any]:
    """Add a locator to ``model`` (``options["model"]``: ``LocatorConfig`` fields) and train it for
    ``options["epochs"]``; returns ``{"history": [...], "metrics": {...}}`` with the kept epoch's
    validation loss, median error and share of levels within 5 mm."""
    from ..data.level_slices import LevelSlices
    from ..errors import SpineModelError

    locator = model.add_locator(**(options.get("model") or {}))
    cfg = model.config.locator
    data_args = {"size": cfg.size, "context": cfg.context, "progress": progress}
    train_set = LevelSlices(root, frame, train_ids, **data_args)
    val_set = LevelSlices(root, frame, val_ids, **data_args)
    if len(train_set) == 0:
        raise SpineModelError(f"no labelled sagittal coordinates in the {len(train_ids)} training studies under {root}")
    device = accelerator.device
    locator.to(device)
    optimizer = torch.optim.AdamW(locator.parameters(), lr=float(options["lr"]), weight_decay=float(options["weight_decay"]))
    batch_size, world, epochs = int(options["batch_size"]), accelerator.num_processes, int(options["epochs"])
    per_process = len(train_set) // world
    steps_per_epoch = max(1, math.ceil(per_process / batch_size))
    scheduler = make_scheduler(optimizer, epochs * steps_per_epoch, 0.1)  # 10% warmup, then cosine
    wrapped, optimizer, scheduler = accelerator.prepare(locator, optimizer, scheduler)

    history, best_loss, best_state, kept = [], math.inf, None, {}
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        wrapped.train()
        local = epoch_shard(len(train_set), accelerator, generator)
        total = 0.0
        for start in tqdm(range(0, len(local), batch_size), desc=f"locator epoch {epoch}/{epochs}", disable=not progress):
            index = local[start:start + batch_size]
            slices, points, mask = augment(train_set.slices[index].float(), train_set.points[index],
                                           train_set.mask[index], float(options["shift"]), generator)
            logits = wrapped(slices.to(device), train_set.planes[index].to(device))
            loss = _loss(logits, points.to(device), mask.to(device))
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            total += float(loss.detach()) * len(index)
        record = {"epoch": epoch, "train_loss": total / max(1, len(local)), **evaluate_locator(locator, val_set)}
        history.append(record)
        if not record["val_loss"] >= best_loss:  # NaN (no val slices) keeps the last epoch
            best_loss, best_state, kept = record["val_loss"], copy.deepcopy(locator.state_dict()), record
    if best_state is not None:
        locator.load_state_dict(best_state)
    metrics = {f"locator_{k}": v for k, v in kept.items() if k != "train_loss"}
    return {"history": history, "metrics": {**metrics, "locator_train_slices": len(train_set),
                                            "locator_val_slices": len(val_set)}}


def augment(slices: torch.Tensor, points: torch.Tensor, mask: torch.Tensor, shift: float,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shift each slice by up to ``shift`` of its side (points follow; a level pushed out of view
    is masked) and apply a random gamma to its intensities."""
    n = slices.shape[0]
    move = (torch.rand(n, 2, generator=generator) - 0.5) * 2 * shift  # in fractions of the side
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = -2 * move  # output pixel p reads input p - move
    grid = F.affine_grid(theta, list(slices.shape), align_corners=False)
    slices = F.grid_sample(slices, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.exp(0.3 * torch.randn(n, 1, 1, 1, generator=generator))
    slices = slices.clamp(0, 1) ** gamma
    points = points + move[:, None, :]
    mask = mask & ((points >= 0) & (points < 1)).all(-1)
    return slices, points, mask


def _loss(logits: torch.Tensor, points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return heatmap_loss(logits, points, mask, coord_weight=COORD_WEIGHT)


@torch.no_grad()
def evaluate_locator(locator: torch.nn.Module, slices: Any, batch_size: int = 64) -> dict[str, float]:
    """Validation loss, median in-plane error (mm) and share of labelled levels within 5 mm;
    NaN without labelled slices."""
    from ..models.locator import decode_heatmaps

    if len(slices) == 0 or not bool(slices.mask.any()):
        return {"val_loss": math.nan, "val_median_mm": math.nan, "val_within_5mm": math.nan}
    was_training = locator.training
    locator.eval()
    device = next(locator.parameters()).device
    losses, errors = [], []
    for start in range(0, len(slices), batch_size):
        part = slice(start, start + batch_size)
        logits = locator(slices.slices[part].float().to(device), slices.planes[part].to(device)).float().cpu()
        mask = slices.mask[part]
        losses.append(float(_loss(logits, slices.points[part], mask)) * int(mask.sum()))
        xy, _ = decode_heatmaps(logits)
        mm = ((xy - slices.points[part]) * slices.mm_per_unit[part][:, None, :]).norm(dim=-1)
        errors.append(mm[mask])
    locator.train(was_training)
    errors = torch.cat(errors)
    return {"val_loss": sum(losses) / int(slices.mask.sum()), "val_median_mm": float(errors.median()),
            "val_within_5mm": float((errors <= 5).float().mean())}
