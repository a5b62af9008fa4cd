"""The out-of-fold label check: leave out training labels the folds contradict.

A fold ensemble (``grader.folds > 1``) grades every study with a member that never trained on it
and writes those grades to ``oof.csv``. A recorded label whose out-of-fold probability is below
``grader.drop_below`` is likelier a mistake of the reader than of the model, and some top RSNA 2024
solutions dropped such labels before their final training. ``grader.oof_from`` names the
``oof.csv``; the grader then trains without those labels (they are still scored on validation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..constants import SUBMISSION_COLUMNS
from ..data.validate import read_csv
from ..errors import SpineModelError

__all__ = ["contradicted_labels", "without_contradicted"]


def contradicted_labels(oof: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The labelled rows of an ``oof.csv`` whose out-of-fold probability of the recorded grade is
    below ``threshold``."""
    labelled = oof[oof.label >= 0]
    recorded = labelled[list(SUBMISSION_COLUMNS)].to_numpy()[np.arange(len(labelled)), labelled.label.to_numpy()]
    return labelled[recorded < threshold]


def without_contradicted(frame: pd.DataFrame, options: dict[str, Any]) -> tuple[pd.DataFrame, int]:
    """``frame`` (:func:`~spinemm.data.load_tables`) with the labels ``grader.drop_below`` /
    ``grader.oof_from`` contradict set to missing (-1), and how many they were; unchanged when
    ``drop_below`` is null."""
    threshold = options["drop_below"]
    if threshold is None:
        return frame, 0
    if not 0.0 < float(threshold) < 1.0:
        raise SpineModelError(f"grader.drop_below must be a probability in (0, 1), got {threshold!r}")
    if not options["oof_from"]:
        raise SpineModelError("grader.drop_below needs grader.oof_from: the oof.csv of a fold ensemble "
                              "(grader.folds > 1 writes it in the grade stage's folder)")
    path = Path(options["oof_from"])
    if not path.is_file():
        raise SpineModelError(f"grader.oof_from: {path} does not exist")
    oof = read_csv(path, ["study_id", "target", "label", *SUBMISSION_COLUMNS])  # strings, columns checked
    try:
        oof = oof.astype({"study_id": np.int64, "target": np.int64, "label": np.int64,
                          **dict.fromkeys(SUBMISSION_COLUMNS, np.float64)})
    except ValueError as err:
        raise SpineModelError(f"{path}: not an oof.csv of numbers ({err})") from None
    dropped = contradicted_labels(oof, float(threshold))
    keys = pd.MultiIndex.from_frame(dropped[["study_id", "target"]])
    hit = pd.MultiIndex.from_frame(frame[["study_id", "target"]]).isin(keys)
    out = frame.copy()
    out.loc[hit, "label"] = -1
    return out, int(hit.sum())
