"""Evaluate a severity model on a DataLoader: probabilities, labels, locations and the metrics.

Metrics are the official score and its four terms (:mod:`spinemm.metrics` on Kaggle solution /
submission frames built from the labels and probabilities), the paper's accuracy / precision /
recall (macro, over every labelled (study, condition, level) row), a per-condition report, location
errors on the labelled coordinates, and throughput. Works with or without an ``Accelerator``: with
one, every process runs its shard and the results are gathered (duplicates of the last batch
dropped) so every process returns the same arrays.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..constants import MISSING_LABEL
from ..files import write_together
from ..metrics import (
    classification_report,
    per_condition_report,
    score_breakdown,
    solution_frame,
    submission_frame,
)
from ..pipeline.detect import detect_outputs, findings_from_outputs

#: Scalar metric keys, in table order.
SCALAR_METRICS = ("score", "spinal", "foraminal", "subarticular", "any_severe_spinal", "accuracy",
                  "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "slice_mae", "xy_mae",
                  "n_studies", "eval_seconds", "eval_studies_per_s")


def severity_metrics(study_ids: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                     location: np.ndarray | None = None, target: np.ndarray | None = None,
                     mask: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of probabilities ``[N, 25, 3]`` against labels ``[N, 25]`` (-1 missing) of studies
    ``study_ids [N]``; with ``location, target [N, 25, 3]`` and ``mask [N, 25]`` also the mean
    absolute slice error (slices) and x/y error (fractions of the image side) where ``mask``."""
    labels = np.asarray(labels, dtype=np.int64)
    solution = solution_frame(study_ids, labels)
    submission = submission_frame(study_ids, probs)
    out: dict[str, Any] = dict(score_breakdown(solution, submission))
    valid = labels != MISSING_LABEL
    report = classification_report(labels[valid], np.asarray(probs)[valid])
    out.update({k: report[k] for k in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall",
                                       "macro_f1")})
    out["per_class"] = report["per_class"]
    out["confusion_matrix"] = report["confusion_matrix"]
    out["per_condition"] = {k: {m: v[m] for m in ("accuracy", "macro_precision", "macro_recall", "n")}
                            for k, v in per_condition_report(labels, probs).items() if k != "overall"}
    if location is not None and target is not None and mask is not None and np.asarray(mask).any():
        m = np.asarray(mask, dtype=bool)
        err = np.abs(np.asarray(location)[m] - np.asarray(target)[m])  # [M, 3]
        out["slice_mae"] = float(err[:, 0].mean())
        out["xy_mae"] = float(err[:, 1:].mean())
    out["n_studies"] = int(len(study_ids))
    return out


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader: DataLoader, accelerator: Any = None, progress: bool = False,
             device: torch.device | str | None = None) -> dict[str, Any]:
    """Run ``model`` over ``loader`` (collated :class:`~spinemm.data.SpineDataset` batches).

    Returns a dict: ``study_ids [N]``, ``probs [N, 25, 3]``, ``labels [N, 25]``, ``location`` and
    ``location_target [N, 25, 3]``, ``location_mask [N, 25]``, ``location_confidence [N, 25]``
    (numpy), ``meta`` (per study), ``metrics`` (see :func:`severity_metrics`, plus ``eval_seconds``
    and ``eval_studies_per_s``) and ``submission`` (Kaggle frame of the probabilities).
    """
    if accelerator is None:
        device = torch.device(device) if device is not None else next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {}
    metas: list[dict] = []
    show = progress and (accelerator is None or accelerator.is_main_process)
    tic = time.perf_counter()
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not show, leave=False):
        # accelerate's loader has moved the batch already
        out = detect_outputs(model, batch, device if accelerator is None else None)
        step = {
            "probs": out["logits"].float().softmax(-1),
            "labels": batch["label"].long(),
            "location": out["location"].float(),
            "location_confidence": out["location_confidence"].float(),
            "location_target": batch["location"].float(),
            "location_mask": batch["location_mask"].to(torch.uint8),
            "study_ids": torch.tensor([int(m["study_id"]) for m in batch["meta"]]),
        }
        meta = batch["meta"]
        if accelerator is not None:
            step = accelerator.gather_for_metrics({k: v.to(accelerator.device) for k, v in step.items()})
            meta = accelerator.gather_for_metrics(meta, use_gather_object=True)
        for key, value in step.items():
            parts.setdefault(key, []).append(value.cpu())
        metas.extend(meta)
    seconds = time.perf_counter() - tic
    result: dict[str, Any] = {k: torch.cat(v).numpy() for k, v in parts.items()}
    result["location_mask"] = result["location_mask"].astype(bool)
    result["meta"] = metas
    metrics = severity_metrics(result["study_ids"], result["labels"], result["probs"], result["location"],
                               result["location_target"], result["location_mask"])
    metrics["eval_seconds"] = seconds
    metrics["eval_studies_per_s"] = len(result["study_ids"]) / max(seconds, 1e-9)
    result["metrics"] = metrics
    result["submission"] = submission_frame(result["study_ids"], result["probs"])
    return result


def write_predictions(result: dict[str, Any], directory: str | Path, prefix: str = "val_") -> dict[str, Path]:
    """Write ``{prefix}submission.csv`` (Kaggle format), ``{prefix}solution.csv`` (the labels, to
    rescore with ``spinemm evaluate``) and ``{prefix}locations.csv`` (predicted locations in the
    original pixels) under ``directory``; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{prefix}{name}.csv" for name in ("submission", "solution", "locations")}
    locations: pd.DataFrame = findings_from_outputs(result["location"], result["location_confidence"],
                                                    result["meta"]).to_frame()
    frames = {"submission": result["submission"], "solution": solution_frame(result["study_ids"], result["labels"]),
              "locations": locations}
    write_together({paths[name]: frame.to_csv(index=False).encode() for name, frame in frames.items()})
    return paths
