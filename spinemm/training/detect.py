"""Train the detect stage (``spinemm.pipeline.DetectStage``'s model): fusion + heads (+ LoRA) on
severity_loss + location_loss.

``train_detect(config)`` is what ``recipes/train_detect.py`` runs. Outputs under
``output_dir``::

    config.yaml               the resolved config
    checkpoint-STEP/          atomic accelerate checkpoints (last checkpoint.keep_last kept)
    best/                     save_pretrained of the best epoch (lowest official score) + its val_*.csv
    model/                    save_pretrained of the final model
    metrics.json              per-epoch history, best, final metrics, throughput
    val_submission.csv        final model's val predictions (Kaggle format), val_solution.csv, val_locations.csv
    tensorboard/              accelerate TensorBoard tracker (when log.tensorboard)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..files import write_atomic
from ..losses import location_loss, severity_loss
from .common import model_card, prepare_training, save_model, setup_run
from .config import load_config
from .engine import TrainState, fit
from .evaluate import SCALAR_METRICS, evaluate_model, write_predictions


def severity_step(train_cfg: dict[str, Any]):
    """batch -> (severity_loss + location_weight * location_loss, parts) for :func:`~.engine.fit`."""
    loc_weight = float(train_cfg["location_weight"])
    any_severe = float(train_cfg["any_severe_weight"])

    def step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(batch)
        sev = severity_loss(out["logits"], batch["label"], any_severe_weight=any_severe)
        loc = location_loss(out["loc_logits"], batch["location"], batch["location_mask"])
        return sev + loc_weight * loc, {"severity_loss": sev, "location_loss": loc}

    return step


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: metrics[k] for k in SCALAR_METRICS if k in metrics}


def train_detect(config: dict[str, Any] | str | Path | None = None, overrides: Any = ()) -> dict[str, Any]:
    """Train the detect stage's model; ``config`` is a dict (merged over the defaults), a YAML path or None.

    Returns ``{"output_dir", "model_dir", "best_dir", "metrics" (final val scalars), "best" (the best
    epoch's record), "history" (one record per evaluated epoch), "throughput", "parameters", "state",
    "stopped", "num_processes", "model"}``; ``model_dir`` is None when the run stopped early through
    ``train.stop_at_step``. Every process must call it under ``accelerate launch``.
    """
    config = load_config(config, overrides)
    run = setup_run(config)
    accelerator, output_dir = run.accelerator, run.output_dir
    parameters = {"total": sum(p.numel() for p in run.model.parameters()),
                  "trainable": sum(p.numel() for p in run.model.parameters() if p.requires_grad)}
    model, optimizer, scheduler = prepare_training(run, run.model)
    train_loader, val_loader = run.train_loader, run.val_loader

    progress = bool(config["log"]["progress"])
    last: dict[str, Any] = {}

    def eval_fn(m: torch.nn.Module) -> dict[str, Any]:
        last["result"] = evaluate_model(m, val_loader, accelerator=accelerator, progress=progress)
        return last["result"]["metrics"]

    def on_best(metrics: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            save_model(accelerator.unwrap_model(model), output_dir / "best", model_card(run, _scalars(metrics)))
            write_predictions(last["result"], output_dir / "best")
        accelerator.wait_for_everyone()

    state, metrics = fit(accelerator, model, optimizer, scheduler, train_loader, run.sampler,
                         severity_step(config["train"]), eval_fn, config, output_dir, on_best=on_best)
    result = _result(config, output_dir, state, accelerator.num_processes)
    result["parameters"] = parameters
    if state.stopped:
        return result
    if metrics is None:  # resumed after the run had finished: evaluate the restored model again
        metrics = eval_fn(model)
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), output_dir / "model", model_card(run, _scalars(metrics)))
        write_predictions(last["result"], output_dir)
    result.update(model_dir=output_dir / "model", metrics=_scalars(metrics))
    summary = {**{k: v for k, v in result.items() if k not in ("output_dir", "model_dir", "best_dir", "state")},
               "per_condition": metrics.get("per_condition"), "confusion_matrix": metrics.get("confusion_matrix"),
               "train_studies": len(run.train_ids), "val_studies": len(run.val_ids), "steps": state.step}
    if accelerator.is_main_process:
        write_atomic(output_dir / "metrics.json", json.dumps(summary, indent=2, default=str).encode())
    accelerator.wait_for_everyone()
    return result


def _result(config: dict[str, Any], output_dir: Path, state: TrainState, num_processes: int) -> dict[str, Any]:
    best = next((h for h in state.history if h["step"] == state.best_step and h["epoch"] == state.best_epoch), None)
    train_rate = state.timed_studies / state.train_seconds if state.train_seconds > 0 else math.nan
    return {
        "output_dir": output_dir,
        "model_dir": None,
        "best_dir": output_dir / "best" if best is not None else None,
        "metrics": None,
        "best": best,
        "history": state.history,
        "throughput": {"train_studies_per_s": train_rate,
                       "eval_studies_per_s": state.history[-1].get("eval_studies_per_s") if state.history else None},
        "state": state,
        "stopped": state.stopped,
        "num_processes": num_processes,
        "model": config["model"]["name"],
    }


def train_severity(config: dict[str, Any] | str | Path | None = None, overrides: Any = ()) -> dict[str, Any]:
    """The old name of :func:`train_detect` (kept for one release; it warns)."""
    import warnings

    warnings.warn("spinemm.training.train_severity is now train_detect (the detect stage's trainer); the old "
                  "name goes in the next release", DeprecationWarning, stacklevel=2)
    return train_detect(config, overrides)
