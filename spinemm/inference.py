"""Kaggle-format predictions with locations for every study of an RSNA-layout folder.

A model with an ROI grader (``SpineCLIP.add_grader``, trained by ``train_grader``) is run in two
stages: the fusion model finds every (condition, level), the level locator (if the model has one,
``spinemm.locate``) sharpens those points, then the grader grades a crop of the original slices at
each; rows it cannot grade keep the fusion model's probabilities.

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

from .constants import CONDITIONS, LABEL_COLUMNS, LEVELS, TARGET_PLANE_INDEX, target_index
from .data.series import Series
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


@torch.no_grad()
def grade_locations(model: torch.nn.Module, root: str | Path, split: str, locations: pd.DataFrame, *,
                    device: torch.device | str | None = None, context: bool = True,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the ROI grader at each row of a location frame (:func:`locations_to_pixels`).

    The grader first re-centres each crop on the finding (x, y and slice) with its offset head
    (``grader.refine`` times), then grades it, and its ``study_context`` (if any, and ``context``)
    weighs each grade with the rest of the study's. Returns ``(probs [N, 3], xy [N, 2],
    instances [N])``: the probabilities, the re-centred x, y in original pixels and the re-centred
    slice's InstanceNumber; NaN (-1) for rows without a location or whose series cannot be read
    (with a warning naming the series).
    """
    from .data.roi import StudySeries

    device = torch.device(device) if device is not None else next(model.parameters()).device
    probs, xy = np.full((len(locations), 3), np.nan), np.full((len(locations), 2), np.nan)
    instances = np.full(len(locations), -1, dtype=np.int64)
    located = locations.reset_index(drop=True)
    located = located[(located["series_id"] >= 0) & located["instance_number"].notna()]
    was_training = model.training
    model.eval()
    try:
        queries = model.grader_queries()  # the text tower runs once, not once per series
        studies = located.groupby("study_id", sort=False)
        for study_id, study in tqdm(studies, desc="ROI grader", unit="study", disable=not progress):
            # Re-centre series by series, then grade the whole study at once (a study-context
            # grader reads each finding beside the rest of its study).
            crops, targets, rows = [], [], []
            study_series = StudySeries(root, split, study_id, "graded")
            for series_id, group in study.groupby("series_id", sort=False):
                series = study_series(series_id)
                if series is None:
                    continue
                index = [series.instance_to_index.get(int(i)) for i in group["instance_number"]]
                keep = np.array([i is not None for i in index])
                if not keep.any():
                    continue
                slices = np.array([i for i in index if i is not None], dtype=np.int64)
                points = group[["x", "y"]].to_numpy(dtype=np.float64)[keep]
                series_targets = torch.tensor([target_index(c, lv) for c, lv in
                                               zip(group["condition"], group["level"], strict=True)])[keep]
                series_crops, slices, points = _recentred_crops(model, series, study_series.volume(series_id), slices,
                                                                points, series_targets, queries, device)
                rows.append(group.index.to_numpy()[keep])
                crops.append(series_crops)
                targets.append(series_targets)
                xy[rows[-1]] = points
                instances[rows[-1]] = series.instance_numbers[slices]
            if rows:
                targets = torch.cat(targets).to(device)
                log_probs = model.grade_with(torch.cat(crops).to(device), targets, queries)["logits"].float().log_softmax(-1)
                if context and model.grader.study_context is not None:
                    log_probs = model.grader.study_context(log_probs, targets % len(LEVELS)).log_softmax(-1)
                probs[np.concatenate(rows)] = log_probs.exp().cpu().numpy()
    finally:
        model.train(was_training)
    return probs, xy, instances


def _recentred_crops(model: torch.nn.Module, series: Series, volume: torch.Tensor, slices: np.ndarray,
                     points: np.ndarray, targets: torch.Tensor, queries: torch.Tensor,
                     device: torch.device) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Crops of one series (``volume``: its normalized volume) at (slice, x, y), moved
    ``grader.refine`` times by the offset head; returns ``(crops [N, C, size, size], slices,
    points)`` at the final positions."""
    from .data.roi import crop_roi

    cfg = model.config.grader
    offsets = range(-cfg.context, cfg.context + 1)
    side_px = np.array([cfg.side_mm / series.pixel_spacing[1], cfg.side_mm / series.pixel_spacing[0]])

    def cut(slices: np.ndarray, points: np.ndarray) -> torch.Tensor:
        return torch.stack([crop_roi(volume, series.pixel_spacing, k, x, y, cfg.side_mm, cfg.size, offsets)
                            for k, (x, y) in zip(slices, points, strict=True)])

    crops = cut(slices, points)
    for _ in range(int(cfg.refine)):
        offset = model.grade_with(crops.to(device), targets, queries)["offset"].float().cpu().numpy()
        points = points + offset[:, :2] * side_px
        slices = np.clip(slices + np.rint(offset[:, 2]).astype(np.int64), 0, len(volume) - 1)
        crops = cut(slices, points)
    return crops, slices, points


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
    locations = locations_to_pixels(result["location"], result["confidence"], result["meta"])
    if getattr(model, "locator", None) is not None:
        from .locate import locate_levels

        locations = locate_levels(model, root, split, locations, device=device, progress=progress)
    probs = result["probs"]
    if getattr(model, "grader", None) is not None:
        graded, xy, instances = grade_locations(model, root, split, locations, device=device, progress=progress)
        probs = np.where(np.isnan(graded), probs.reshape(-1, probs.shape[-1]), graded).reshape(probs.shape)
        refined = ~np.isnan(xy[:, 0])
        locations.loc[refined, ["x", "y"]] = xy[refined]
        locations.loc[refined, "instance_number"] = instances[refined]
    submission = submission_from_probs(predicted, probs, order)
    return submission, locations
