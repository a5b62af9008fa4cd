"""The official RSNA 2024 Lumbar Spine metric, Kaggle frame builders and classification reports.

The score (DESIGN §2) is the mean of four weighted log losses: one multi-class loss per condition
group (spinal, foraminal, subarticular) and a binary "any severe spinal" loss per study. Rows carry
the official sample weights 1 / 2 / 4 for a true Normal/Mild / Moderate / Severe. Lower is better.

Frames are Kaggle's: the solution has ``row_id, normal_mild, moderate, severe`` (one-hot) and
``sample_weight``; the submission has ``row_id, normal_mild, moderate, severe`` (probabilities).
Everything here is numpy + pandas. The generic classification metrics are checked against
scikit-learn, their reference, in tests/test_metrics_sklearn.py (scikit-learn is a dev dependency only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .constants import (
    CONDITIONS,
    LABEL_COLUMNS,
    LEVELS,
    METRIC_GROUPS,
    MISSING_LABEL,
    NUM_CLASSES,
    NUM_TARGETS,
    SEVERITIES,
    SEVERITY_WEIGHTS,
    SUBMISSION_COLUMNS,
    parse_row_id,
    row_id,
)
from .errors import SpineDataError

#: Probabilities are clipped to [EPS, 1 - EPS] before the log, as sklearn's log_loss did (eps=1e-15).
EPS = 1e-15
#: Weight of the any-severe-spinal term relative to each condition group (Kaggle's any_severe_scalar).
ANY_SEVERE_SCALAR = 1.0

_PROB_COLS = list(SUBMISSION_COLUMNS)
_GROUP_OF_CONDITION = {c: g for g, conds in METRIC_GROUPS.items() for c in conds}
_CONDITION_OF_COLUMN = {col: c for c in CONDITIONS for col in LABEL_COLUMNS if col.startswith(c + "_")}


# --------------------------------------------------------------------------------------------
# Kaggle frames
# --------------------------------------------------------------------------------------------


def _study_id_array(study_ids: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    ids = np.asarray(study_ids)
    if ids.ndim != 1 or len(ids) != n:
        raise SpineDataError(f"study_ids must be a 1-D sequence of {n} ids, got shape {ids.shape}")
    if len(ids) and not np.issubdtype(ids.dtype, np.integer):
        raise SpineDataError(f"study_ids must be integers, got dtype {ids.dtype}")
    if (ids < 0).any():
        raise SpineDataError(f"study_ids must be non-negative, got {ids[ids < 0][:5].tolist()}")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise SpineDataError(f"duplicate study_ids: {uniq[counts > 1][:5].tolist()}")
    return ids.astype(np.int64)


def solution_frame(study_ids: Sequence[int] | np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Kaggle solution frame from integer labels ``[N, 25]`` (``-1`` = missing; that row is dropped).

    Rows are in study order, then ``LABEL_COLUMNS`` order. Columns: ``row_id``, the one-hot
    ``normal_mild, moderate, severe`` (int) and ``sample_weight`` (1 / 2 / 4, float).
    """
    lab = np.asarray(labels)
    if lab.ndim != 2 or lab.shape[1] != NUM_TARGETS:
        raise SpineDataError(f"labels must have shape [N, {NUM_TARGETS}], got {lab.shape}")
    ids = _study_id_array(study_ids, lab.shape[0])
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise SpineDataError(f"labels must be integers, got dtype {lab.dtype}")
    bad = ~np.isin(lab, [MISSING_LABEL, *range(NUM_CLASSES)])
    if bad.any():
        i, t = np.argwhere(bad)[0]
        raise SpineDataError(
            f"label {lab[i, t]} of study {ids[i]}, column {LABEL_COLUMNS[t]} is not in -1..2"
        )
    study_idx, target_idx = np.nonzero(lab != MISSING_LABEL)  # row-major: study order, then columns
    y = lab[study_idx, target_idx].astype(np.int64)
    frame = pd.DataFrame(
        {"row_id": [row_id(ids[i], LABEL_COLUMNS[t]) for i, t in zip(study_idx, target_idx, strict=True)]}
    )
    onehot = np.eye(NUM_CLASSES, dtype=np.int64)[y]
    for k, col in enumerate(SUBMISSION_COLUMNS):
        frame[col] = onehot[:, k]
    frame["sample_weight"] = np.asarray(SEVERITY_WEIGHTS, dtype=np.float64)[y]
    return frame


def submission_frame(study_ids: Sequence[int] | np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """Kaggle submission frame from probabilities ``[N, 25, 3]``: 25 rows per study, in study order."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3 or p.shape[1:] != (NUM_TARGETS, NUM_CLASSES):
        raise SpineDataError(f"probs must have shape [N, {NUM_TARGETS}, {NUM_CLASSES}], got {p.shape}")
    ids = _study_id_array(study_ids, p.shape[0])
    if not np.isfinite(p).all():
        raise SpineDataError("probs contain non-finite values")
    frame = pd.DataFrame({"row_id": [row_id(s, col) for s in ids for col in LABEL_COLUMNS]})
    flat = p.reshape(-1, NUM_CLASSES)
    for k, col in enumerate(SUBMISSION_COLUMNS):
        frame[col] = flat[:, k]
    return frame


# --------------------------------------------------------------------------------------------
# Validation and alignment
# --------------------------------------------------------------------------------------------


def _numeric_block(frame: pd.DataFrame, cols: list[str], name: str) -> np.ndarray:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise SpineDataError(f"{name} frame lacks column(s) {missing}; it has {list(frame.columns)}")
    for c in cols:
        if not pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]):
            raise SpineDataError(f"{name} column {c!r} must be numeric, got dtype {frame[c].dtype}")
    values = frame[cols].to_numpy(dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        raise SpineDataError(f"{name} row {r}, column {cols[c]!r} is not finite ({values[r, c]})")
    return values


def _row_ids(frame: pd.DataFrame, col: str, name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validated row ids -> (ids as str, study ids, label columns)."""
    if col not in frame.columns:
        raise SpineDataError(f"{name} frame lacks the row id column {col!r}; it has {list(frame.columns)}")
    ids = frame[col].astype(str).to_numpy()
    dup = pd.Index(ids).duplicated()
    if dup.any():
        raise SpineDataError(f"{name} has duplicate {col} values, e.g. {ids[dup][:5].tolist()}")
    studies = np.empty(len(ids), dtype=np.int64)
    columns = []
    for r, rid in enumerate(ids):
        try:
            studies[r], column = parse_row_id(rid)
        except ValueError as err:
            raise SpineDataError(f"{name} row {r}, column {col!r}: {err}") from None
        columns.append(column)
    return ids, studies, columns


def _aligned(solution: pd.DataFrame, submission: pd.DataFrame, row_id_column_name: str) -> dict[str, Any]:
    """Validate both frames and return solution-ordered arrays: the rows the metric scores."""
    if len(solution) == 0:
        raise SpineDataError("solution frame is empty")
    sol_ids, studies, columns = _row_ids(solution, row_id_column_name, "solution")
    onehot = _numeric_block(solution, _PROB_COLS, "solution")
    ok = np.isin(onehot, (0.0, 1.0)).all(axis=1) & (onehot.sum(axis=1) == 1)
    if not ok.all():
        r = int(np.flatnonzero(~ok)[0])
        raise SpineDataError(
            f"solution row {r} ({sol_ids[r]}): {_PROB_COLS} must be one-hot, got {onehot[r].tolist()}"
        )
    y = onehot.argmax(axis=1)
    if "sample_weight" in solution.columns:
        weight = _numeric_block(solution, ["sample_weight"], "solution")[:, 0]
        if (weight <= 0).any():
            r = int(np.flatnonzero(weight <= 0)[0])
            raise SpineDataError(f"solution row {r} ({sol_ids[r]}), column 'sample_weight' must be > 0")
    else:
        weight = np.asarray(SEVERITY_WEIGHTS, dtype=np.float64)[y]

    sub_ids, _, _ = _row_ids(submission, row_id_column_name, "submission")
    probs = _numeric_block(submission, _PROB_COLS, "submission")
    if (probs < 0).any():
        r, c = np.argwhere(probs < 0)[0]
        raise SpineDataError(f"submission row {r} ({sub_ids[r]}), column {_PROB_COLS[c]!r} is negative")
    total = probs.sum(axis=1)
    if (total <= 0).any():
        r = int(np.flatnonzero(total <= 0)[0])
        raise SpineDataError(f"submission row {r} ({sub_ids[r]}) has all-zero probabilities")
    pos = pd.Index(sub_ids).get_indexer(sol_ids)
    if (pos < 0).any():
        absent = sol_ids[pos < 0]
        raise SpineDataError(
            f"submission lacks {len(absent)} row(s) of the solution, e.g. {absent[:5].tolist()}"
        )
    # Extra submission rows (targets without a label) are ignored, as in Kaggle's metric.
    p = probs[pos] / total[pos, None]
    # Normalise first, then clip: only p_true enters each loss, and clipping a normalised row
    # keeps it a distribution up to EPS (sklearn clipped raw values, which distorts rows summing > 1).
    p = np.clip(p, EPS, 1.0 - EPS)
    return {
        "study": studies,
        "column": np.asarray(columns),
        "group": np.asarray([_GROUP_OF_CONDITION[_CONDITION_OF_COLUMN[c]] for c in columns]),
        "y": y,
        "weight": weight,
        "probs": p,
    }


# --------------------------------------------------------------------------------------------
# The score
# --------------------------------------------------------------------------------------------


def _weighted_log_loss(y: np.ndarray, probs: np.ndarray, weight: np.ndarray) -> float:
    """sum(w * -log p_true) / sum(w) over rows; ``probs`` already normalised and clipped."""
    p_true = probs[np.arange(len(y)), y]
    return float(np.sum(weight * -np.log(p_true)) / np.sum(weight))


def _any_severe_spinal(a: dict[str, Any]) -> float:
    """Binary weighted log loss of "any spinal level is Severe", one row per study.

    Kaggle's metric notebook takes the max of the *raw* ``severe`` column for this term (only the
    multi-class terms are renormalised, inside sklearn's log_loss). We use the normalised probability
    for all four terms: the two agree exactly for a proper submission (rows summing to 1), and this
    keeps the whole score invariant to the scale of each row, as DESIGN §2 states. Unlike sklearn,
    a solution whose studies are all (or none) severe is scored instead of raising.
    """
    spinal = a["group"] == "spinal"
    studies, inverse = np.unique(a["study"][spinal], return_inverse=True)
    label = np.zeros(len(studies))
    pred = np.zeros(len(studies))
    weight = np.zeros(len(studies))
    np.maximum.at(label, inverse, (a["y"][spinal] == 2).astype(np.float64))
    np.maximum.at(pred, inverse, a["probs"][spinal, 2])
    np.maximum.at(weight, inverse, a["weight"][spinal])
    loss = -(label * np.log(pred) + (1.0 - label) * np.log(1.0 - pred))
    return float(np.sum(weight * loss) / np.sum(weight))


def _breakdown(a: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for group in METRIC_GROUPS:
        rows = a["group"] == group
        if not rows.any():
            raise SpineDataError(
                f"solution has no rows of the {group!r} group; the official score needs all three"
            )
        out[group] = _weighted_log_loss(a["y"][rows], a["probs"][rows], a["weight"][rows])
    out["any_severe_spinal"] = _any_severe_spinal(a)
    terms = [out[g] for g in METRIC_GROUPS]
    out["score"] = float(
        (sum(terms) + ANY_SEVERE_SCALAR * out["any_severe_spinal"]) / (len(terms) + ANY_SEVERE_SCALAR)
    )
    return out


def score_breakdown(
    solution: pd.DataFrame, submission: pd.DataFrame, row_id_column_name: str = "row_id"
) -> dict[str, float]:
    """The four terms of the official score and the score: keys spinal, foraminal, subarticular,
    any_severe_spinal, score. Raises SpineDataError on malformed frames or a group with no rows."""
    return _breakdown(_aligned(solution, submission, row_id_column_name))


def rsna_score(solution: pd.DataFrame, submission: pd.DataFrame, row_id_column_name: str = "row_id") -> float:
    """Official RSNA 2024 Lumbar Spine score of a submission frame against a solution frame.

    Only solution rows are scored (extra submission rows are ignored); a solution row absent from the
    submission raises SpineDataError. If the solution has no ``sample_weight`` column the official
    weights 1 / 2 / 4 are derived from the one-hot truth.
    """
    return score_breakdown(solution, submission, row_id_column_name)["score"]


# --------------------------------------------------------------------------------------------
# Classification metrics (the paper's accuracy / precision / recall, beside the official score)
# --------------------------------------------------------------------------------------------


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, and 0 where den == 0 (sklearn's zero_division=0), without warnings."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def classification_report(y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro and per-class precision / recall / F1 and the confusion matrix.

    ``y_true`` is ``[N]`` in 0..2; ``probs`` is either probabilities ``[N, 3]`` (argmax is taken) or
    predicted classes ``[N]``. Conventions for empty classes (as sklearn with ``zero_division=0``):
    a class never predicted has precision 0, a class with no support has recall 0 and F1 0, and the
    macro averages run over all three classes. ``balanced_accuracy`` is the mean recall over the
    classes that do have support (sklearn's definition). ``confusion_matrix[i][j]`` counts true class
    ``i`` predicted as ``j``.
    """
    y = np.asarray(y_true)
    if y.ndim != 1 or len(y) == 0:
        raise SpineDataError(f"y_true must be a non-empty 1-D array, got shape {y.shape}")
    p = np.asarray(probs)
    if p.ndim == 2 and p.shape == (len(y), NUM_CLASSES):
        if not np.isfinite(p).all():
            raise SpineDataError("probs contain non-finite values")
        pred = p.argmax(axis=1)
    elif p.ndim == 1 and len(p) == len(y):
        pred = p
    else:
        raise SpineDataError(
            f"predictions must be [{len(y)}, {NUM_CLASSES}] probs or [{len(y)}] classes, got {p.shape}"
        )
    for name, v in (("y_true", y), ("y_pred", pred)):
        if not np.issubdtype(v.dtype, np.integer) or ((v < 0) | (v >= NUM_CLASSES)).any():
            raise SpineDataError(
                f"{name} must hold integer classes 0..{NUM_CLASSES - 1} (drop missing labels first)"
            )
    cm = np.bincount(y * NUM_CLASSES + pred, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {
        "n": int(len(y)),
        "accuracy": float(tp.sum() / len(y)),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            sev: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k, sev in enumerate(SEVERITIES)
        },
        "confusion_matrix": cm.tolist(),
    }


def per_condition_report(labels: np.ndarray, probs: np.ndarray) -> dict[str, dict[str, Any]]:
    """:func:`classification_report` per condition key and ``"overall"``, from labels ``[S, 25]``
    (``-1`` ignored) and probabilities ``[S, 25, 3]``. Conditions without any label are left out."""
    lab, p = np.asarray(labels), np.asarray(probs)
    if lab.ndim != 2 or lab.shape[1] != NUM_TARGETS or p.shape != (*lab.shape, NUM_CLASSES):
        raise SpineDataError(
            f"need labels [S, {NUM_TARGETS}] and probs [S, {NUM_TARGETS}, {NUM_CLASSES}], got {lab.shape}, {p.shape}"
        )
    valid = lab != MISSING_LABEL
    out: dict[str, dict[str, Any]] = {}
    for c, condition in enumerate(CONDITIONS):
        cols = slice(c * len(LEVELS), (c + 1) * len(LEVELS))
        if valid[:, cols].any():
            out[condition] = classification_report(lab[:, cols][valid[:, cols]], p[:, cols][valid[:, cols]])
    if valid.any():
        out["overall"] = classification_report(lab[valid], p[valid])
    return out


def evaluate_frames(
    solution: pd.DataFrame, submission: pd.DataFrame, row_id_column_name: str = "row_id"
) -> dict[str, Any]:
    """Everything ``spinemm evaluate`` reports for a Kaggle solution / submission pair.

    Keys: ``score`` and ``official`` (the :func:`score_breakdown` dict), ``classification`` (argmax of the
    normalised probabilities vs the one-hot truth, over all scored rows), ``per_condition``
    (condition key -> classification report plus that condition's weighted ``log_loss``),
    ``n_rows`` and ``n_studies``. All values are JSON-serialisable.
    """
    a = _aligned(solution, submission, row_id_column_name)
    breakdown = _breakdown(a)
    condition = np.asarray([_CONDITION_OF_COLUMN[c] for c in a["column"]])
    per_condition: dict[str, dict[str, Any]] = {}
    for name in CONDITIONS:
        rows = condition == name
        if rows.any():
            report = classification_report(a["y"][rows], a["probs"][rows])
            report["log_loss"] = _weighted_log_loss(a["y"][rows], a["probs"][rows], a["weight"][rows])
            per_condition[name] = report
    return {
        "score": breakdown["score"],
        "official": breakdown,
        "classification": classification_report(a["y"], a["probs"]),
        "per_condition": per_condition,
        "n_rows": int(len(a["y"])),
        "n_studies": int(len(np.unique(a["study"]))),
    }


def format_metrics(result: Mapping[str, Any]) -> str:
    """Pretty-print the dict of :func:`spinemm.metrics.evaluate_frames`."""
    official = result["official"]
    lines = [f"official score {official['score']:.4f}  (lower is better)"]
    lines += [f"  {k:<18} {official[k]:.4f}" for k in ("spinal", "foraminal", "subarticular", "any_severe_spinal")]
    report = result["classification"]
    lines.append(
        f"accuracy {report['accuracy']:.3f}  balanced accuracy {report['balanced_accuracy']:.3f}  "
        f"macro precision {report['macro_precision']:.3f}  recall {report['macro_recall']:.3f}  "
        f"F1 {report['macro_f1']:.3f}"
    )
    per_class = report["per_class"]
    lines.append("  class          precision  recall  f1     support")
    for name in SEVERITIES:
        c = per_class[name]
        lines.append(f"  {name:<14} {c['precision']:.3f}      {c['recall']:.3f}   {c['f1']:.3f}  {c['support']}")
    lines.append("confusion matrix (rows true, columns predicted): " + str(report["confusion_matrix"]))
    return "\n".join(lines)
