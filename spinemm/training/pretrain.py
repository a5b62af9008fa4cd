"""Contrastive pretraining of the dual encoder on (finding crop, severity prompt) pairs.

Every labelled (study, condition, level) with a coordinate gives one pair: a crop of the ORIGINAL
slice around the label point, with a side of ``model.config.roi_side_mm`` millimetres, and a random
template of :func:`spinemm.text.severity_prompts` for its condition, level and severity. Crops come
from :class:`~spinemm.data.roi.ROIWindows` (each series read once), shifted at random by up to
``pretrain.shift`` of the side. Why the original slices: a canal that narrows by a few millimetres
is a pixel or two in the fusion model's resampled stacks. On the demo phantom, crops of the 64 px
stacks left zero-shot at chance (balanced accuracy 0.36, chance 0.33) and the contrastive loss flat;
crops of the original slices learn (see ``benchmarks/RESULTS.md``).

The loss is :func:`spinemm.losses.clip_loss`, class-aware by default (``pretrain.positives``):
pairs of the same severity are positives of each other, not negatives. With ``pretrain.balanced``
the pairs are drawn in inverse proportion to their severity's frequency, so a batch is not three
quarters "Normal/Mild". Negatives are the pairs of the same process's batch.

Validation, on every process over all val pairs (centred crops, first template): the contrastive
loss (the ``score``, lower is better) and zero-shot accuracy / precision / recall of the 3 severity
prompts of each pair's (condition, level), scored as :func:`spinemm.zero_shot_classify` scores.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from ..constants import CONDITIONS, LEVELS, SEVERITIES
from ..errors import SpineModelError
from ..files import write_atomic
from ..losses import clip_loss
from ..metrics import classification_report
from ..models.prompt_classifier import build_zero_shot_classifier
from ..pipeline.detect import preprocess_settings
from ..text import severity_prompts
from .common import model_card, prepare_training, save_model, start_run
from .config import load_config
from .engine import fit, make_loader

POSITIVES = ("severity", "text", "pair")


@cache
def target_prompts(target: int) -> dict[str, list[str]]:
    """Severity prompt templates of target ``target`` (an index into ``LABEL_COLUMNS``)."""
    return severity_prompts(CONDITIONS[target // len(LEVELS)], LEVELS[target % len(LEVELS)])


def finding_windows(root: Path, frame: Any, study_ids: list[int], model: nn.Module, pretrain: dict[str, Any],
                    train: bool, progress: bool = True, store: Any = None) -> Any:
    """The finding crops of ``study_ids`` as :class:`~spinemm.data.roi.ROIWindows`: one original
    slice, ``model.config.roi_side_mm`` wide, cut at ``pretrain.crop_size`` pixels (default: the
    vision tower's input size), with room for ``pretrain.shift`` when ``train``."""
    from ..data.roi import ROIWindows

    size = int(pretrain.get("crop_size") or preprocess_settings(model)["image_size"])
    return ROIWindows(root, frame, study_ids, side_mm=float(model.config.roi_side_mm), size=size, context=0,
                      shift=float(pretrain["shift"]) if train else 0.0, slice_jitter=0, progress=progress,
                      store=store)


class FindingPairs(Dataset):
    """(crop, prompt) pairs of :class:`~spinemm.data.roi.ROIWindows`: item ``i`` is ``{"crop":
    [3, S, S] (the slice in every channel, as zero_shot_classify feeds a 2-D image), "text",
    "severity", "target"}``. Training pairs get a random shift and template from a generator seeded
    by ``(seed, epoch, i)`` (never the global RNG, so a resumed run repeats); others are centred,
    with the first template."""

    def __init__(self, windows: Any, seed: int = 0, train: bool = True) -> None:
        self.windows, self.seed, self.train, self.epoch = windows, int(seed), bool(train), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        target, label = int(self.windows.targets[index]), int(self.windows.labels[index])
        templates = target_prompts(target)[SEVERITIES[label]]
        generator, pick = None, 0
        if self.train:
            state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(2, dtype=np.uint32)
            generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            pick = int(torch.randint(len(templates), (), generator=generator))
        crop, _ = self.windows.crops(torch.tensor([int(index)]), generator)
        return {"crop": crop[0].expand(3, -1, -1), "text": templates[pick], "severity": label, "target": target}


def balance_weights(labels: torch.Tensor) -> torch.Tensor:
    """Sampling weight of each item: the inverse frequency of its label."""
    counts = torch.bincount(labels).double()
    return counts.reciprocal()[labels]


def pair_labels(severity: torch.Tensor, texts: list[str], positives: str) -> torch.Tensor | None:
    """clip_loss labels: severity class, prompt identity, or None (only the pair itself)."""
    if positives == "severity":
        return severity
    if positives == "text":
        index = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        return torch.tensor([index[t] for t in texts], dtype=torch.long)
    return None


class ContrastiveObjective(nn.Module):
    """Wraps a SpineCLIP so the contrastive loss runs inside ``forward`` (DDP and autocast apply)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, crops: torch.Tensor, texts: list[str], labels: torch.Tensor | None) -> torch.Tensor:
        image = self.model.encode_image(crops)
        text = self.model.encode_text(texts)
        if labels is not None:
            labels = labels.to(image.device)
        return clip_loss(image, text, self.model.logit_scale, labels=labels)


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: FindingPairs, positives: str, batch_size: int = 256) -> dict[str, Any]:
    """Val contrastive loss (``score``) and zero-shot severity metrics over all ``pairs``."""
    was_training = model.training
    model.eval()
    device = model.logit_scale.device
    images, texts = [], []
    try:
        for start in range(0, len(pairs), batch_size):
            batch = default_collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
            images.append(model.encode_image(batch["crop"].to(device), normalize=True).float().cpu())
            texts.extend(batch["text"])
        image = torch.cat(images)
        distinct = list(dict.fromkeys(texts))  # 3 prompts per target, however many pairs
        encoded = torch.cat([model.encode_text(distinct[i:i + batch_size], normalize=True).float().cpu()
                             for i in range(0, len(distinct), batch_size)])
        position = {t: i for i, t in enumerate(distinct)}
        text = encoded[[position[t] for t in texts]]
        severity, target = pairs.windows.labels, pairs.windows.targets
        scale = model.logit_scale.detach().float().cpu()
        loss = float(clip_loss(image, text, scale, labels=pair_labels(severity, texts, positives)))
        probs = torch.zeros(len(severity), len(SEVERITIES))
        for t in target.unique().tolist():
            rows = target == t
            classifier = build_zero_shot_classifier(model, target_prompts(t))
            probs[rows] = classifier(image[rows].to(device), scale.exp().clamp(max=100.0)).float().cpu()
    finally:
        model.train(was_training)
    report = classification_report(severity.numpy(), probs.numpy())
    return {"score": loss, "zero_shot_accuracy": report["accuracy"],
            "zero_shot_balanced_accuracy": report["balanced_accuracy"],
            "zero_shot_macro_precision": report["macro_precision"],
            "zero_shot_macro_recall": report["macro_recall"], "n_pairs": len(pairs)}


def pretrain_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run config: ``pretrain.output_dir / epochs / lr`` (and ``pretrain.towers``, the dual
    encoder's architecture) in place of the severity run's."""
    run = copy.deepcopy(config)
    pre = config["pretrain"]
    run["output_dir"] = pre["output_dir"]
    if pre["epochs"] is not None:
        run["train"]["epochs"] = int(pre["epochs"])
    if pre["lr"] is not None:
        run["optim"]["lr"] = float(pre["lr"])
    if pre["positives"] not in POSITIVES:
        raise SpineModelError(f"pretrain.positives must be one of {POSITIVES}, got {pre['positives']!r}")
    if pre["towers"]:
        if config["init_from"]:
            raise SpineModelError(f"pretrain.towers builds a fresh dual encoder, but init_from={config['init_from']} "
                                  "loads one: set only one of them")
        if not isinstance(pre["towers"], dict):
            raise SpineModelError(f"pretrain.towers must be a mapping of create_model overrides, got {pre['towers']!r}")
        # the towers are the whole architecture: data's sizes are the detect model's, not this one's
        run["model"] = {**run["model"], "kwargs": {**(run["model"]["kwargs"] or {}), **pre["towers"]}}
        run["data"] = {**run["data"], "num_slices": None, "image_size": None, "channels": None}
    return run


def pretrain_clip(config: dict[str, Any] | str | Path | None = None, overrides: Any = ()) -> dict[str, Any]:
    """Contrastively pretrain the dual encoder; saves ``pretrain.output_dir/model`` (save_pretrained).

    Returns ``{"output_dir", "model_dir", "best_dir", "metrics", "history", "state", "stopped",
    "roi_side_mm"}`` (the crop side the saved model was pretrained on).
    Every process must call it under ``accelerate launch``.
    """
    config = pretrain_config(load_config(config, overrides))
    run = start_run(config)
    accelerator, output_dir, model, pre = run.accelerator, run.output_dir, run.model, config["pretrain"]
    if pre["side_mm"] is not None:
        model.config.roi_side_mm = float(pre["side_mm"])  # saved with the model, for zero-shot crops
    progress = bool(config["log"]["progress"]) and accelerator.is_main_process
    seed = int(config["train"]["seed"])
    train_windows, val_windows = (finding_windows(run.root, run.frame, ids, model, pre, train, progress, run.store)
                                  for ids, train in ((run.train_ids, True), (run.val_ids, False)))
    for name, windows, ids in (("training", train_windows, run.train_ids), ("val", val_windows, run.val_ids)):
        if len(windows) == 0:
            raise SpineModelError(f"none of the {len(ids)} {name} studies under {run.root} has a labelled "
                                  "coordinate (train_label_coordinates.csv): no (crop, prompt) pairs to pretrain on")
    train_pairs, val_pairs = FindingPairs(train_windows, seed, train=True), FindingPairs(val_windows, train=False)
    weights = balance_weights(train_windows.labels) if pre["balanced"] else None
    run.train_loader, run.sampler = make_loader(train_pairs, int(pre["batch_size"]), default_collate, seed,
                                                shuffle=True, num_workers=int(config["data"]["num_workers"]),
                                                weights=weights)
    objective, optimizer, scheduler = prepare_training(run, ContrastiveObjective(model))
    positives = pre["positives"]

    def step(obj: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return obj(batch["crop"], list(batch["text"]), pair_labels(batch["severity"], list(batch["text"]), positives)), {}

    def inner() -> nn.Module:
        return accelerator.unwrap_model(objective).model

    def eval_fn(_: nn.Module) -> dict[str, Any]:
        return evaluate_pairs(inner(), val_pairs, positives)

    def on_best(metrics: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            save_model(inner(), output_dir / "best", model_card(run, metrics))
        accelerator.wait_for_everyone()

    state, metrics = fit(accelerator, objective, optimizer, scheduler, run.train_loader, run.sampler, step, eval_fn,
                         config, output_dir, on_best=on_best, watch=("pretrain",))
    result = {"output_dir": output_dir, "model_dir": None, "best_dir": output_dir / "best", "metrics": metrics,
              "history": state.history, "state": state, "stopped": state.stopped,
              "roi_side_mm": model.config.roi_side_mm}
    if state.stopped:
        return result
    if metrics is None:  # resumed after the run had finished
        metrics = result["metrics"] = eval_fn(objective)
    if accelerator.is_main_process:
        save_model(inner(), output_dir / "model", model_card(run, metrics))
        summary = {"metrics": metrics, "best": {"score": state.best_score, "epoch": state.best_epoch,
                                                "step": state.best_step},
                   "history": state.history, "steps": state.step, "roi_side_mm": model.config.roi_side_mm,
                   "crop_size": train_windows.size, "train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
                   "skipped_rows": train_windows.skipped + val_windows.skipped,
                   "num_processes": accelerator.num_processes}
        write_atomic(output_dir / "metrics.json", json.dumps(summary, indent=2).encode())
    accelerator.wait_for_everyone()
    result["model_dir"] = output_dir / "model"
    return result
