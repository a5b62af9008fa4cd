"""Second stage: train the ROI grader on crops of the original slices at the label points.

``train_grader(config)`` is what ``recipes/train_grader.py`` runs. It loads the fusion model from
``init_from`` (``train_severity``'s ``best/`` or ``model/``), freezes it, first trains a level
locator on the labelled sagittal slices when ``locator.epochs`` > 0
(:mod:`spinemm.training.locator`), then adds a grader
(``SpineCLIP.add_grader`` with ``grader.model`` options) and trains only the grader on
:class:`~spinemm.data.roi.ROIWindows` of the training studies. Every crop is shifted at random by
up to ``grader.shift`` of its side and ``grader.slice_jitter`` slices, about the fusion model's own
location error, so the grader tolerates the locations it will be given. The epoch with the lowest
weighted validation loss at the label points is kept. Then the two-stage model is evaluated the way
it will be used, at the fusion model's PREDICTED locations on the validation studies, and the
grader's study context (``grader.model.study_context``, on by default) is fitted there
(:mod:`spinemm.training.study_context`); its reported score is cross-fitted over those studies.
Outputs under ``grader.output_dir``::

    config.yaml      the resolved config
    model/           save_pretrained of the fusion model + grader (spinemm.load_model reads it)
    metrics.json     per-epoch history (and locator_history); val scores of the fusion model alone
                     (fusion_score), the grader without (grader_score) and with its study context
                     (score); the locator's val errors (locator_val_median_mm, locator_val_within_5mm)
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..constants import NUM_TARGETS
from ..errors import SpineModelError
from ..losses import weighted_cross_entropy
from .common import epoch_shard, prepare_root, seed_everything, split_studies
from .config import load_config, save_config
from .engine import make_accelerator, make_scheduler
from .locator import fit_locator

# L1 weights of the offset (x, y in fractions of the crop side, ~0.1; slice in slices, ~1), which
# put each on about the footing of the cross-entropy.
OFFSET_WEIGHTS = (10.0, 10.0, 1.0)


def _offset_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(OFFSET_WEIGHTS, dtype=predicted.dtype, device=predicted.device)
    return ((predicted - target).abs() * weights).sum(-1).mean()


def val_solution(frame: pd.DataFrame, study_ids: list[int]) -> pd.DataFrame:
    """Kaggle solution frame of ``study_ids`` from a :func:`~spinemm.data.load_tables` frame."""
    from ..metrics import solution_frame

    labels = np.full((len(study_ids), NUM_TARGETS), -1, dtype=np.int64)
    position = {s: i for i, s in enumerate(study_ids)}
    rows = frame[frame["study_id"].isin(study_ids)]
    labels[rows["study_id"].map(position).to_numpy(), rows["target"].to_numpy()] = rows["label"].to_numpy()
    return solution_frame(study_ids, labels)


def train_grader(config: dict[str, Any] | str | Path | None = None, overrides: Any = ()) -> dict[str, Any]:
    """Train the ROI grader of the fusion model in ``init_from``; returns ``{"output_dir", "model_dir",
    "history", "metrics"}`` where metrics holds the val official scores at predicted locations of
    the fusion model alone (``fusion_score``), the grader without its study context
    (``grader_score``) and both stages with it (``score``, cross-fitted)."""
    from ..data.roi import ROIWindows
    from ..data.tables import load_tables
    from ..models.factory import load_model

    config = load_config(config, overrides)
    options = config["grader"]
    if not config["init_from"]:
        raise SpineModelError("train_grader needs init_from: the fusion model to add a grader to "
                              "(train_severity's output_dir/best or output_dir/model)")
    output_dir = Path(options["output_dir"])
    accelerator = make_accelerator(config, output_dir)
    if accelerator.is_main_process:
        save_config(config, output_dir / "config.yaml")
    seed = int(config["train"]["seed"])
    seed_everything(seed)
    progress = bool(config["log"]["progress"]) and accelerator.is_main_process
    root = prepare_root(config, accelerator)
    frame = load_tables(root, "train")
    train_ids, val_ids = split_studies(frame, config)

    model = load_model(config["init_from"])
    model.requires_grad_(False)
    model.eval()  # the frozen fusion model and text tower stay in eval mode (dropout off)
    located: dict[str, Any] = {"history": [], "metrics": {}}
    if int(config["locator"]["epochs"]) > 0:
        located = fit_locator(model, root, frame, train_ids, val_ids, config["locator"], accelerator, seed, progress)
        model.locator.requires_grad_(False)
        model.locator.eval()
    grader = model.add_grader(**(options["model"] or {}))
    cfg = model.config.grader
    window_args = {"side_mm": cfg.side_mm, "size": cfg.size, "context": cfg.context, "progress": progress}
    train_set = ROIWindows(root, frame, train_ids, shift=float(options["shift"]),
                           slice_jitter=int(options["slice_jitter"]), **window_args)
    val_set = ROIWindows(root, frame, val_ids, shift=0.0, slice_jitter=0, **window_args)
    if len(train_set) == 0:
        raise SpineModelError(f"no labelled coordinates in the {len(train_ids)} training studies under {root}")

    model.to(accelerator.device)
    with torch.no_grad():
        queries = model.grader_queries().detach()  # [25, dim], frozen text tower
    optimizer = torch.optim.AdamW(grader.parameters(), lr=float(options["lr"]),
                                  weight_decay=float(options["weight_decay"]))
    batch_size, world = int(options["batch_size"]), accelerator.num_processes
    per_process = len(train_set) // world  # equal batch counts on every process (DDP)
    steps_per_epoch = max(1, math.ceil(per_process / batch_size))
    epochs = int(options["epochs"])
    scheduler = make_scheduler(optimizer, epochs * steps_per_epoch, float(config["optim"]["warmup_ratio"]))
    wrapped, optimizer, scheduler = accelerator.prepare(grader, optimizer, scheduler)

    history, best_loss, best_state = [], math.inf, None
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        wrapped.train()
        local = epoch_shard(len(train_set), accelerator, generator)
        total = 0.0
        bar = tqdm(range(0, len(local), batch_size), desc=f"grader epoch {epoch}/{epochs}", disable=not progress)
        for start in bar:
            index = local[start:start + batch_size]
            crops, offsets = (t.to(accelerator.device) for t in train_set.crops(index, generator))
            labels = train_set.labels[index].to(accelerator.device)
            out = wrapped(crops, queries[train_set.targets[index].to(queries.device)])
            loss = weighted_cross_entropy(out["logits"], labels) + _offset_loss(out["offset"], offsets)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(wrapped.parameters(), float(config["optim"]["max_grad_norm"]))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            total += float(loss.detach()) * len(index)
        record = {"epoch": epoch, "train_loss": total / max(1, len(local)), "val_loss": _val_loss(model, val_set, queries)}
        history.append(record)
        if record["val_loss"] < best_loss:
            best_loss, best_state = record["val_loss"], copy.deepcopy(grader.state_dict())
    if best_state is not None:
        grader.load_state_dict(best_state)

    result: dict[str, Any] = {"output_dir": output_dir, "model_dir": output_dir / "model", "history": history,
                              "locator_history": located["history"]}
    if accelerator.is_main_process:
        result["metrics"] = {**_fit_and_score(model, root, frame, val_ids, config["data"]["cache_dir"], progress),
                             **located["metrics"],
                             "best_val_loss": best_loss, "train_rows": len(train_set), "val_rows": len(val_set),
                             "skipped_rows": train_set.skipped + val_set.skipped}
        model.save_pretrained(output_dir / "model")
        (output_dir / "metrics.json").write_text(json.dumps({**result["metrics"], "history": history,
                                                             "locator_history": located["history"]}, indent=2))
    accelerator.wait_for_everyone()
    return result


def _fit_and_score(model: torch.nn.Module, root: Path, frame: pd.DataFrame, val_ids: list[int],
                   cache_dir: Any, progress: bool) -> dict[str, float]:
    """Val official scores at the fusion model's predicted locations: the fusion model alone,
    the grader alone and, when the grader has a study context, with it. The context is fitted
    here on all val studies; its reported score is cross-fitted (out-of-fold over the studies)."""
    from ..inference import predict, submission_from_probs
    from ..metrics import rsna_score
    from .study_context import cross_fitted, fit_study_context, val_grades

    if not val_ids:
        return {}  # nothing to score or fit on: the study context stays the identity
    grader, model.grader = model.grader, None
    fusion, locations = predict(model, root, "train", study_ids=val_ids, cache_dir=cache_dir, progress=progress)
    model.grader = grader
    solution = val_solution(frame, val_ids)
    study_order = locations["study_id"].unique().tolist()  # predict's row order: study x LABEL_COLUMNS
    fusion_probs = fusion[["normal_mild", "moderate", "severe"]].to_numpy(dtype=np.float64)
    grades = val_grades(model, root, frame, locations, progress=progress)

    def score(graded: torch.Tensor) -> float:
        probs = fusion_probs.copy()
        probs[grades.rows] = graded.numpy()
        return rsna_score(solution, submission_from_probs(study_order, probs.reshape(len(study_order), NUM_TARGETS, -1)))

    scores = {"fusion_score": rsna_score(solution, fusion), "grader_score": score(grades.log_probs.exp())}
    scores["score"] = scores["grader_score"]
    if grader.study_context is not None and len(grades.labels):
        scores["score"] = score(cross_fitted(grades))
        fit_study_context(grader.study_context, grades)
        fitted = {name: value.detach() for name, value in grader.study_context.named_parameters()}
        scores["study_context"] = {"log_temperature": float(fitted["log_temperature"]),
                                   "weight": fitted["mix.weight"].tolist(), "bias": fitted["mix.bias"].tolist()}
    return scores


@torch.no_grad()
def _val_loss(model: torch.nn.Module, windows: Any, queries: torch.Tensor, batch_size: int = 256) -> float:
    """Weighted cross-entropy of the grader on centred val crops (NaN without val rows)."""
    if len(windows) == 0:
        return math.nan
    grader = model.grader
    was_training = grader.training
    grader.eval()
    device = queries.device
    logits = []
    for start in range(0, len(windows), batch_size):
        index = torch.arange(start, min(start + batch_size, len(windows)))
        crops, _ = windows.crops(index)
        logits.append(grader(crops.to(device), queries[windows.targets[index].to(device)])["logits"])
    grader.train(was_training)
    return float(weighted_cross_entropy(torch.cat(logits), windows.labels.to(device)))
