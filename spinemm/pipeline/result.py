"""What a pipeline run returns: every stage's output for its studies, and the submission frame.

Its own module (below :mod:`.pipeline` and :mod:`.parallel`), so that the process-parallel runs
can join their shares without importing the pipeline that starts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import SpineDataError, SpineModelError
from ..metrics import submission_frame
from .findings import Findings

__all__ = ["PipelineResult", "submission_from_probs"]


@dataclass
class PipelineResult:
    """Every stage's output for the studies of one run (study-major, ``LABEL_COLUMNS`` order).

    Unpacks as ``submission, locations = result`` (the final stage's), as ``spinemm.predict`` did.
    """

    study_ids: list[int]
    detect_probs: np.ndarray  # [B, 25, 3]
    detected: Findings
    located: Findings | None = None
    grade_log_probs: np.ndarray | None = None  # [B * 25, 3] without study context; NaN: not graded
    grade_probs: np.ndarray | None = None  # [B * 25, 3] with the study context; NaN: not graded
    graded: Findings | None = None
    order: list[str] | None = None  # sample_submission's row order, when it applies

    @property
    def probs(self) -> np.ndarray:
        """Final probabilities [B, 25, 3]: graded where the grade stage graded, else detect's."""
        flat = self.detect_probs.reshape(-1, self.detect_probs.shape[-1])
        if self.grade_probs is not None:
            flat = np.where(np.isnan(self.grade_probs), flat, self.grade_probs)
        return flat.reshape(self.detect_probs.shape)

    @property
    def findings(self) -> Findings:
        """The final stage's points."""
        return next(f for f in (self.graded, self.located, self.detected) if f is not None)

    def submission(self, stage: str = "final") -> pd.DataFrame:
        """Kaggle submission (rows sum to 1) of the final result or of ``stage="detect"`` alone."""
        if stage not in ("final", "detect"):
            raise SpineModelError(f"stage must be 'final' or 'detect', got {stage!r}")
        return submission_from_probs(self.study_ids, self.probs if stage == "final" else self.detect_probs, self.order)

    def locations(self) -> pd.DataFrame:
        """The location frame of the final points (``locations.csv``)."""
        return self.findings.to_frame()

    def __iter__(self):
        yield self.submission()
        yield self.locations()

    @classmethod
    def concat(cls, parts: list[PipelineResult]) -> PipelineResult:
        """The results of disjoint shares of studies as one, in the order of ``parts``."""
        def joined(name: str, join):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else join(values)

        return cls([s for p in parts for s in p.study_ids], np.concatenate([p.detect_probs for p in parts]),
                   Findings.concat([p.detected for p in parts]), joined("located", Findings.concat),
                   joined("grade_log_probs", np.concatenate), joined("grade_probs", np.concatenate),
                   joined("graded", Findings.concat))


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
