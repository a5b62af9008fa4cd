"""Fit the grader's :class:`~spinemm.models.grader.StudyContext` on held-out studies.

The grader reads each crop alone. Its study context then weighs every grade with the mean grade of
the rest of the study and of the same disc level (ten parameters). It is fitted after the grader,
on the validation studies graded at the pipeline's PREDICTED locations: the inputs it will see
in ``predict``, from studies neither stage trained on. Fitted on training studies instead, it would
learn from grades the grader has memorised.

:func:`val_grades` collects those inputs, :func:`fit_study_context` fits the ten parameters, and
:func:`cross_fitted` gives out-of-fold outputs, so the reported validation score is not scored on
the studies the context was fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..constants import LEVELS
from ..losses import weighted_cross_entropy
from ..models.grader import StudyContext
from ..pipeline.grade import Grades

__all__ = ["ValGrades", "val_grades", "fit_study_context", "cross_fitted"]


@dataclass
class ValGrades:
    """The grader's per-crop grades of some studies, one entry per graded (study, column)."""

    log_probs: torch.Tensor  # [N, 3], without study context
    targets: torch.Tensor  # [N] label column 0..24
    studies: torch.Tensor  # [N] study_id
    labels: torch.Tensor  # [N] recorded label, -1 where missing
    rows: np.ndarray  # [N] row of the graded record (study order x LABEL_COLUMNS)

    @property
    def levels(self) -> torch.Tensor:
        return self.targets % len(LEVELS)


def val_grades(grades: Grades, frame: pd.DataFrame) -> ValGrades:
    """The graded rows of ``grades`` (the grade stage's output on training-split studies, without
    study context), each with its recorded label from ``frame`` (:func:`~spinemm.data.load_tables`)."""
    graded = np.flatnonzero(grades.graded)
    targets = grades.findings.target[graded]
    studies = grades.findings.study_id[graded]
    recorded = frame.set_index(["study_id", "target"])["label"]
    keys = pd.MultiIndex.from_arrays([studies, targets])
    labels = recorded.reindex(keys).fillna(-1).to_numpy(dtype=np.int64)
    log_probs = torch.tensor(grades.log_probs[graded], dtype=torch.float32)
    return ValGrades(log_probs, torch.tensor(targets), torch.tensor(studies), torch.tensor(labels), graded)


def fit_study_context(context: StudyContext, grades: ValGrades, subset: torch.Tensor | None = None,
                      l2: float = 1e-3) -> float:
    """Fit ``context`` in place by L-BFGS on the weighted (1/2/4) cross-entropy of the labelled
    rows, with a small L2 pull towards the identity; returns the final loss. ``subset``: a boolean
    mask of the rows to fit on (whole studies, so each study's means are complete)."""
    keep = torch.ones(len(grades.labels), dtype=torch.bool) if subset is None else subset
    log_probs, levels, studies, labels = (t[keep] for t in (grades.log_probs, grades.levels, grades.studies,
                                                             grades.labels))
    if not (labels >= 0).any():
        return float("nan")
    params = list(context.parameters())
    optimizer = torch.optim.LBFGS(params, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = context(log_probs, levels, studies)
        loss = weighted_cross_entropy(logits, labels) + l2 * sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        return float(closure().detach())


def cross_fitted(grades: ValGrades, folds: int = 5, seed: int = 0) -> torch.Tensor:
    """Out-of-fold study-context probabilities ``[N, 3]``: each fold of studies is scored by a
    context fitted on the other folds."""
    study_ids = torch.unique(grades.studies)
    fold_of = torch.randperm(len(study_ids), generator=torch.Generator().manual_seed(seed)) % max(2, folds)
    fold = fold_of[torch.searchsorted(study_ids, grades.studies)]
    probs = torch.empty_like(grades.log_probs)
    for k in fold.unique().tolist():
        context = StudyContext(grades.log_probs.shape[-1])
        fit_study_context(context, grades, subset=fold != k)
        held = fold == k
        with torch.no_grad():
            probs[held] = context(grades.log_probs[held], grades.levels[held], grades.studies[held]).softmax(-1)
    return probs
