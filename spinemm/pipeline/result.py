"""What a pipeline run returns: every stage's output for its studies, and the submission frame.

Its own module (below :mod:`.pipeline` and :mod:`.parallel`), so that the process-parallel runs
can join their shares without importing the pipeline that starts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..constants import LABEL_COLUMNS
from ..errors import SpineDataError, SpineModelError
from ..metrics import submission_frame
from .findings import Findings
from .stage import StageOutput, merge_probs

__all__ = ["PipelineResult", "submission_from_probs"]


@dataclass
class PipelineResult:
    """Every stage's output for the studies of one run, by stage name in the order they ran
    (rows study-major, ``LABEL_COLUMNS`` order).

    Unpacks as ``submission, locations = result`` (the final stage's), as ``spinemm.predict`` did.
    """

    study_ids: list[int]
    outputs: dict[str, StageOutput] = field(default_factory=dict)
    order: list[str] | None = None  # sample_submission's row order, when it applies
    # [N, 2]: the final points in the pixels of their own slices (findings.slice_points), which
    # locations() writes; None: the final findings' own (every slice at its series' size)
    slice_xy: np.ndarray | None = None

    def probs_after(self, stage: str | None = None) -> np.ndarray:
        """Probabilities ``[B, 25, 3]`` after ``stage`` (default: the last): each stage's rows
        where it gave them (not NaN), else the stages' before it."""
        names = list(self.outputs)
        if stage is not None and stage not in names:
            raise SpineModelError(f"stage must be one of {names} (or 'final'), got {stage!r}")
        flat = None
        for name in names[:names.index(stage) + 1] if stage is not None else names:
            flat = merge_probs(flat, self.outputs[name].probs)
        if flat is None:
            return np.zeros((len(self.study_ids), len(LABEL_COLUMNS), 3))
        return flat.reshape(len(self.study_ids), len(LABEL_COLUMNS), -1)

    @property
    def probs(self) -> np.ndarray:
        """Final probabilities [B, 25, 3]: each row from the last stage that graded it."""
        return self.probs_after()

    @property
    def findings(self) -> Findings:
        """The final stage's points."""
        return list(self.outputs.values())[-1].findings

    # the built-in stages' outputs under the names the result has always had
    @property
    def detect_probs(self) -> np.ndarray:
        return self.probs_after("detect")

    @property
    def detected(self) -> Findings:
        return self.outputs["detect"].findings

    @property
    def located(self) -> Findings | None:
        return self.outputs["locate"].findings if "locate" in self.outputs else None

    @property
    def graded(self) -> Findings | None:
        return self.outputs["grade"].findings if "grade" in self.outputs else None

    @property
    def grade_probs(self) -> np.ndarray | None:
        """[B * 25, 3] with the study context; NaN: not graded."""
        return self.outputs["grade"].probs if "grade" in self.outputs else None

    @property
    def grade_log_probs(self) -> np.ndarray | None:
        """[B * 25, 3] without the study context; NaN: not graded."""
        return self.outputs["grade"].extras["log_probs"] if "grade" in self.outputs else None

    def submission(self, stage: str = "final") -> pd.DataFrame:
        """Kaggle submission (rows sum to 1) of the final result or of the stages up to ``stage``
        (``stage="detect"``: the first stage alone)."""
        probs = self.probs if stage == "final" else self.probs_after(stage)
        return submission_from_probs(self.study_ids, probs, self.order)

    def locations(self) -> pd.DataFrame:
        """The location frame of the final points (``locations.csv``), each in the pixels of the
        slice it names, as ``train_label_coordinates.csv`` has them."""
        if self.slice_xy is None:
            return self.findings.to_frame()
        return self.findings.replace(x=self.slice_xy[:, 0], y=self.slice_xy[:, 1]).to_frame()

    def __iter__(self):
        yield self.submission()
        yield self.locations()

    @classmethod
    def concat(cls, parts: list[PipelineResult]) -> PipelineResult:
        """The results of disjoint shares of studies as one, in the order of ``parts``."""
        names = list(parts[0].outputs) if parts else []
        xy = [p.slice_xy if p.slice_xy is not None else
              np.stack([p.findings.x, p.findings.y], axis=1) for p in parts]
        return cls([s for p in parts for s in p.study_ids],
                   {name: StageOutput.concat([p.outputs[name] for p in parts]) for name in names},
                   slice_xy=np.concatenate(xy) if any(p.slice_xy is not None for p in parts) else None)


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
