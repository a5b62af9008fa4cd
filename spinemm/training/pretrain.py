"""Contrastive pretraining of the dual encoder on (ROI crop, severity prompt) pairs.

Every labelled (study, condition, level) with a coordinate gives one pair: a crop of the condition's
plane at the labelled slice, centred on the label coordinate (:func:`spinemm.zero_shot.crop_roi`),
and one template of :func:`spinemm.text.severity_prompts` for its condition, level and severity.
The loss is :func:`spinemm.losses.clip_loss`, class-aware by default (``pretrain.positives``):
pairs of the same severity are positives of each other, not negatives. Negatives are the pairs
of the same process's batch (no cross-process gather; plenty at 8+ crops per study).

Validation: the contrastive loss over all val pairs (first template; the ``score``, lower is
better) and zero-shot accuracy / precision / recall of the 3 severity prompts of each pair's
(condition, level), scored the way :func:`spinemm.zero_shot_classify` scores.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..constants import CONDITIONS, LEVELS, SEVERITIES, TARGET_PLANE_INDEX
from ..errors import SpineModelError
from ..inference import preprocess_settings
from ..losses import clip_loss
from ..metrics import classification_report
from ..text import severity_prompts
from ..zero_shot import build_zero_shot_classifier, crop_roi
from .common import prepare_training, save_model, setup_run
from .config import load_config
from .engine import fit

POSITIVES = ("severity", "text", "pair")


@cache
def _prompts(target: int) -> dict[str, list[str]]:
    return severity_prompts(CONDITIONS[target // len(LEVELS)], LEVELS[target % len(LEVELS)])


def roi_pairs(batch: dict[str, Any], crop_size: int, per_study: int | None = None,
              random_template: bool = True) -> dict[str, Any]:
    """(crop, prompt) pairs of a collated batch.

    Takes up to ``per_study`` labelled targets with a known location per study (a random subset
    drawn from the global torch RNG; None = all, in target order) and returns ``crops
    [N, C, crop_size, crop_size]``, ``texts`` (N prompts: a random template, or the first),
    ``severity [N]``, ``target [N]`` (index into LABEL_COLUMNS) and ``study [N]`` (batch row).
    """
    image = batch["image"]  # [B, P, S, C, H, W]
    labels, location = batch["label"].cpu(), batch["location"].cpu()
    usable = (batch["location_mask"].cpu() & (labels >= 0))  # [B, 25]
    n_slices = image.shape[2]
    crops, texts, severity, targets, studies = [], [], [], [], []
    for b in range(image.shape[0]):
        chosen = torch.nonzero(usable[b]).flatten()
        if per_study is not None and len(chosen) > per_study:
            chosen = chosen[torch.randperm(len(chosen))[:per_study]].sort().values
        for t in chosen.tolist():
            slice_index = int(location[b, t, 0].round().clamp(0, n_slices - 1))
            plane_image = image[b, TARGET_PLANE_INDEX[t], slice_index]  # [C, H, W]
            crops.append(crop_roi(plane_image, float(location[b, t, 1]), float(location[b, t, 2]), crop_size,
                                  normalized=True))
            cls = int(labels[b, t])
            templates = _prompts(t)[SEVERITIES[cls]]
            pick = int(torch.randint(len(templates), ())) if random_template else 0
            texts.append(templates[pick])
            severity.append(cls)
            targets.append(t)
            studies.append(b)
    size = (0, image.shape[3], crop_size, crop_size)
    return {
        "crops": torch.stack(crops) if crops else image.new_zeros(size),
        "texts": texts,
        "severity": torch.tensor(severity, dtype=torch.long),
        "target": torch.tensor(targets, dtype=torch.long),
        "study": torch.tensor(studies, dtype=torch.long),
    }


def pair_labels(pairs: dict[str, Any], positives: str) -> torch.Tensor | None:
    """clip_loss labels: severity class, prompt identity, or None (only the pair itself)."""
    if positives == "severity":
        return pairs["severity"]
    if positives == "text":
        index = {t: i for i, t in enumerate(dict.fromkeys(pairs["texts"]))}
        return torch.tensor([index[t] for t in pairs["texts"]], dtype=torch.long)
    return None


class ContrastiveObjective(nn.Module):
    """Wraps a SpineCLIP so the contrastive loss runs inside ``forward`` (DDP and autocast apply)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, crops: torch.Tensor, texts: list[str], labels: torch.Tensor | None) -> torch.Tensor:
        if len(texts) == 0:  # a batch without a labelled coordinate: nothing to pull together
            return self.model.logit_scale * 0.0
        image = self.model.encode_image(crops)
        text = self.model.encode_text(texts)
        if labels is not None:
            labels = labels.to(image.device)
        return clip_loss(image, text, self.model.logit_scale, labels=labels)


@torch.no_grad()
def evaluate_contrastive(model: nn.Module, loader: Any, crop_size: int, positives: str,
                         accelerator: Any = None) -> dict[str, Any]:
    """Val contrastive loss (``score``) and zero-shot severity metrics over all val pairs."""
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    try:
        for batch in loader:
            pairs = roi_pairs(batch, crop_size, per_study=None, random_template=False)
            image = model.encode_image(pairs["crops"], normalize=True).float().cpu() if pairs["texts"] else None
            text = model.encode_text(pairs["texts"], normalize=True).float().cpu() if pairs["texts"] else None
            per_study = []  # one record per study so gather_for_metrics can drop padded duplicates
            for b in range(len(batch["meta"])):
                rows = (pairs["study"] == b).nonzero().flatten()
                per_study.append({
                    "image": image[rows] if image is not None else torch.zeros(0, 0),
                    "text": text[rows] if text is not None else torch.zeros(0, 0),
                    "texts": [pairs["texts"][i] for i in rows.tolist()],
                    "severity": pairs["severity"][rows], "target": pairs["target"][rows]})
            if accelerator is not None:
                per_study = accelerator.gather_for_metrics(per_study, use_gather_object=True)
            records.extend(r for r in per_study if len(r["texts"]))
        if not records:
            raise SpineModelError("no val study has a labelled coordinate: nothing to evaluate contrastively")
        image = torch.cat([r["image"] for r in records])
        text = torch.cat([r["text"] for r in records])
        severity = torch.cat([r["severity"] for r in records])
        target = torch.cat([r["target"] for r in records])
        all_texts = [t for r in records for t in r["texts"]]
        scale = model.logit_scale.detach().float().cpu()
        labels = pair_labels({"severity": severity, "texts": all_texts}, positives)
        loss = float(clip_loss(image, text, scale, labels=labels))
        probs = torch.zeros(len(severity), len(SEVERITIES))
        for t in target.unique().tolist():
            rows = target == t
            classifier = build_zero_shot_classifier(model, _prompts(t))
            probs[rows] = classifier(image[rows], scale.exp().clamp(max=100.0)).cpu().float()
    finally:
        model.train(was_training)
    report = classification_report(severity.numpy(), probs.numpy())
    return {"score": loss, "zero_shot_accuracy": report["accuracy"],
            "zero_shot_balanced_accuracy": report["balanced_accuracy"],
            "zero_shot_macro_precision": report["macro_precision"],
            "zero_shot_macro_recall": report["macro_recall"], "n_pairs": int(len(severity))}


def pretrain_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run config: ``pretrain.output_dir / epochs / lr`` in place of the severity run's."""
    run = copy.deepcopy(config)
    pre = config["pretrain"]
    run["output_dir"] = pre["output_dir"]
    if pre["epochs"] is not None:
        run["train"]["epochs"] = int(pre["epochs"])
    if pre["lr"] is not None:
        run["optim"]["lr"] = float(pre["lr"])
    if pre["positives"] not in POSITIVES:
        raise SpineModelError(f"pretrain.positives must be one of {POSITIVES}, got {pre['positives']!r}")
    return run


def pretrain_clip(config: dict[str, Any] | str | Path | None = None, overrides: Any = ()) -> dict[str, Any]:
    """Contrastively pretrain the dual encoder; saves ``pretrain.output_dir/model`` (save_pretrained).

    Returns ``{"output_dir", "model_dir", "best_dir", "metrics", "history", "state", "stopped"}``.
    Every process must call it under ``accelerate launch``.
    """
    config = pretrain_config(load_config(config, overrides))
    run = setup_run(config)
    accelerator, output_dir, model = run.accelerator, run.output_dir, run.model
    crop_size = max(4, int(round(float(config["pretrain"]["crop_fraction"]) * preprocess_settings(model)["image_size"])))
    objective, optimizer, scheduler = prepare_training(run, ContrastiveObjective(model))
    train_loader, val_loader = run.train_loader, run.val_loader
    positives, per_study = config["pretrain"]["positives"], int(config["pretrain"]["crops_per_study"])

    def step(obj: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs = roi_pairs(batch, crop_size, per_study)
        return obj(pairs["crops"], pairs["texts"], pair_labels(pairs, positives)), {}

    def inner() -> nn.Module:
        return accelerator.unwrap_model(objective).model

    def eval_fn(_: nn.Module) -> dict[str, Any]:
        return evaluate_contrastive(inner(), val_loader, crop_size, positives, accelerator)

    def on_best(_: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            save_model(inner(), output_dir / "best")
        accelerator.wait_for_everyone()

    state, metrics = fit(accelerator, objective, optimizer, scheduler, train_loader, run.sampler, step, eval_fn,
                         config, output_dir, on_best=on_best)
    result = {"output_dir": output_dir, "model_dir": None, "best_dir": output_dir / "best",
              "metrics": metrics, "history": state.history, "state": state, "stopped": state.stopped}
    if state.stopped:
        return result
    if metrics is None:  # resumed after the run had finished
        metrics = result["metrics"] = eval_fn(objective)
    if accelerator.is_main_process:
        save_model(inner(), output_dir / "model")
        summary = {"metrics": metrics, "best": {"score": state.best_score, "epoch": state.best_epoch,
                                                "step": state.best_step},
                   "history": state.history, "steps": state.step, "crop_size": crop_size,
                   "num_processes": accelerator.num_processes}
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    result["model_dir"] = output_dir / "model"
    return result
