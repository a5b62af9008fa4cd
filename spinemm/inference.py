"""Kaggle-format predictions with locations for every study of an RSNA-layout folder.

Nothing is dropped: a study whose series is missing or unreadable still gets all 25 rows (the model
sees that plane as missing, with a warning naming the series), and its location rows say NaN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .constants import CONDITIONS, LABEL_COLUMNS, LEVELS, TARGET_PLANE_INDEX
from .errors import SpineDataError, SpineModelError
from .metrics import submission_frame

LOCATION_COLUMNS = ("study_id", "condition", "level", "series_id", "instance_number", "x", "y", "confidence")


def preprocess_settings(model: torch.nn.Module) -> dict:
    """The dataset settings a model was built for (``num_slices``, ``image_size``, ``channels``)."""
    cfg = getattr(model, "preprocess_cfg", None)
    if not isinstance(cfg, dict):
        raise SpineModelError(f"{type(model).__name__} has no preprocess_cfg; build it with spinemm.create_model")
    return {k: cfg[k] for k in ("num_slices", "image_size", "channels")}


@torch.no_grad()
def run_model(model: torch.nn.Module, loader: DataLoader, device: torch.device | str | None = None,
              progress: bool = True) -> dict[str, list]:
    """Run ``model`` over a loader of collated batches; returns probabilities, locations and metas."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, list] = {"probs": [], "location": [], "confidence": [], "label": [], "meta": []}
    try:
        for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress):
            tensors = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            result = model(tensors)
            out["probs"].append(result["logits"].float().softmax(-1).cpu())
            out["location"].append(result["location"].float().cpu())
            out["confidence"].append(result["location_confidence"].float().cpu())
            out["label"].append(batch["label"])
            out["meta"].extend(batch["meta"])
    finally:
        model.train(was_training)
    return {k: (torch.cat(v).numpy() if k != "meta" else v) for k, v in out.items()}


def locations_to_pixels(location: np.ndarray, confidence: np.ndarray, metas: list[dict]) -> pd.DataFrame:
    """Decode model-frame locations [N, 25, 3] (slice, x/W, y/H) into original instance and pixels."""
    rows = []
    for study_loc, study_conf, meta in zip(location, confidence, metas, strict=True):
        for target in range(len(LABEL_COLUMNS)):
            plane = TARGET_PLANE_INDEX[target]
            condition, level = CONDITIONS[target // len(LEVELS)], LEVELS[target % len(LEVELS)]
            series_id = int(meta["series_ids"][plane])
            instances = np.asarray(meta["instance_numbers"][plane])
            if series_id < 0 or len(instances) == 0:
                rows.append((meta["study_id"], condition, level, -1, np.nan, np.nan, np.nan, 0.0))
                continue
            slice_f, x, y = (float(v) for v in study_loc[target])
            index = int(np.clip(round(slice_f), 0, len(instances) - 1))
            height, width = meta["original_shape"][plane]
            rows.append((meta["study_id"], condition, level, series_id, int(instances[index]),
                         x * width, y * height, float(study_conf[target])))
    frame = pd.DataFrame(rows, columns=list(LOCATION_COLUMNS))
    frame["instance_number"] = frame["instance_number"].astype("Int64")
    return frame


def submission_from_probs(study_ids: list[int], probs: np.ndarray, order: list[str] | None = None) -> pd.DataFrame:
    """Kaggle submission frame, rows renormalised to sum to 1; rows follow ``order`` (e.g.
    sample_submission's row_ids) when given, else study order x ``LABEL_COLUMNS``."""
    probs = np.asarray(probs, dtype=np.float64)
    frame = submission_frame(study_ids, probs / probs.sum(-1, keepdims=True))
    if order is None:
        return frame
    missing = sorted(set(order) - set(frame.row_id))
    if missing:
        raise SpineDataError(f"sample_submission.csv asks for rows of studies that were not predicted, e.g. {missing[:3]}")
    return frame.set_index("row_id").loc[order].reset_index()


def _sample_submission_order(root: Path, split: str) -> list[str] | None:
    path = root / "sample_submission.csv"
    if split != "test" or not path.exists():
        return None
    return pd.read_csv(path, usecols=["row_id"])["row_id"].astype(str).tolist()


def predict(model: torch.nn.Module, root: str | Path, split: str = "test", *, batch_size: int = 2,
            num_workers: int = 0, device: torch.device | str | None = None, cache_dir: str | Path | None = None,
            study_ids: list[int] | None = None, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predict severity and location for every study of ``root``'s ``split``.

    Returns ``(submission, locations)``: the submission has every study x 25 rows, in
    ``sample_submission.csv`` order when that file exists (else study order x ``LABEL_COLUMNS``),
    rows summing to 1; locations has one row per (study, condition, level) with the series,
    instance_number and x, y in the original pixels, plus the model's confidence. ``study_ids``
    restricts the run to those studies (then the rows follow study order).
    """
    from .data.dataset import SpineDataset, collate

    root = Path(root)
    dataset = SpineDataset(root, split=split, study_ids=study_ids, augment=False, cache_dir=cache_dir,
                           on_bad_series="warn", **preprocess_settings(model))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    result = run_model(model, loader, device=device, progress=progress)
    order = _sample_submission_order(root, split) if study_ids is None else None
    predicted = [int(m["study_id"]) for m in result["meta"]]
    submission = submission_from_probs(predicted, result["probs"], order)
    locations = locations_to_pixels(result["location"], result["confidence"], result["meta"])
    return submission, locations
