"""How far predicted locations are from the labelled ones, in millimetres of patient space.

Both points are in the pixels of the slice they name (as label coordinates and ``locations.csv``
are); each is mapped into its series' grid and through the DICOM geometry (:meth:`Series.voxel_to_patient`), so
the distance counts in-plane pixel spacing and the through-plane gap when the predicted instance is
not the labelled one. A prediction on another series than the label's counts too (same patient
space); a row without a prediction counts as missed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.store import SeriesStore

KEYS = ["study_id", "condition", "level"]


def location_errors(root: str | Path, split: str, locations: pd.DataFrame, frame: pd.DataFrame,
                    store: SeriesStore | None = None) -> pd.DataFrame:
    """One row per labelled (study, condition, level) with a prediction row: ``error_mm`` (NaN when
    nothing was predicted for it). ``locations`` is the frame of :func:`spinemm.predict`, ``frame``
    that of :func:`spinemm.data.load_tables` (it holds the label coordinates); ``store``: where the
    series are read from (e.g. the prediction run's, so no file is decoded again)."""
    store = store if store is not None else SeriesStore(root, split)
    truth = frame[frame.instance_number.notna()][[*KEYS, "series_id", "instance_number", "x", "y"]]
    merged = truth.merge(locations, on=KEYS, how="inner", suffixes=("_true", "_pred"))

    def point(study: int, series_id: int, instance: float, x: float, y: float) -> np.ndarray | None:
        if series_id < 0 or pd.isna(instance):
            return None
        series = store.get(int(study), int(series_id))
        k = series.instance_to_index.get(int(instance))
        if k is None:
            return None
        x, y = series.to_grid_pixels(k, float(x), float(y))
        return series.voxel_to_patient(np.array([[x, y, k]], dtype=float))[0]

    errors = []
    for r in merged.itertuples():
        true = point(r.study_id, r.series_id_true, r.instance_number_true, r.x_true, r.y_true)
        pred = point(r.study_id, r.series_id_pred, r.instance_number_pred, r.x_pred, r.y_pred)
        errors.append(np.nan if true is None or pred is None else float(np.linalg.norm(true - pred)))
    return merged.assign(error_mm=errors)


def summarize_errors(errors: pd.DataFrame, thresholds_mm: Sequence[float] = (5.0, 10.0)) -> dict[str, float]:
    """Median error and the fraction of labelled rows located within each threshold (misses count)."""
    e = errors.error_mm.to_numpy(dtype=float)
    out = {"n_rows": int(len(e)), "median_mm": float(np.nanmedian(e)) if np.isfinite(e).any() else float("nan")}
    for t in thresholds_mm:
        out[f"within_{t:g}mm"] = float(np.mean(np.nan_to_num(e, nan=np.inf) <= t)) if len(e) else float("nan")
    return out
