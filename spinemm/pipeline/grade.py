"""Stage "grade": severity from 2.5D crops of the original slices at each located finding.

For every located finding the stage cuts a crop of the original slices (``spinemm.data.roi``,
``config.side_mm`` wide), re-centres it ``config.refine`` times with the grader's offset head
(x, y and slice), grades it, and lets its :class:`~spinemm.models.grader.StudyContext` (when it has
one) weigh each grade with the rest of the study. Each finding is conditioned on its label column's
query embedding, kept with the stage (``queries``, from the first stage's text tower), so the stage
needs no other model at run time.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from ..constants import LABEL_COLUMNS, LEVELS, NUM_CLASSES
from ..data.roi import crop_roi
from ..data.series import Series
from ..data.store import SeriesStore
from ..models.config import GraderConfig
from ..models.grader import ROIGrader, StudyContext
from .findings import Findings

__all__ = ["GradeStage", "Grades"]


class Grades:
    """What the grade stage returns for a record of N findings."""

    def __init__(self, log_probs: np.ndarray, findings: Findings) -> None:
        self.log_probs = log_probs  # float64 [N, 3]: without the study context; NaN where not graded
        self.findings = findings  # the re-centred points (unchanged where not graded)

    @property
    def graded(self) -> np.ndarray:
        return ~np.isnan(self.log_probs[:, 0])


class GradeStage(torch.nn.Module):
    """The ROI grader as a pipeline stage (config: :class:`~spinemm.models.config.GraderConfig`)."""

    name = "grade"

    def __init__(self, config: GraderConfig | None = None, query_dim: int = 256) -> None:
        super().__init__()
        self.config = config or GraderConfig()
        self.query_dim = int(query_dim)
        self.grader = ROIGrader(self.config, self.query_dim, NUM_CLASSES)
        self.register_buffer("queries", torch.zeros(len(LABEL_COLUMNS), self.query_dim))
        self.study_context = StudyContext(NUM_CLASSES) if self.config.study_context else None

    def config_dict(self) -> dict:
        return {**asdict(self.config), "query_dim": self.query_dim}

    def forward(self, crops: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Crops ``[N, 1 + 2 context, size, size]`` for label columns ``targets [N]`` -> ``{"logits":
        [N, 3], "offset": [N, 3]}`` (the finding's offset from the crop centre: x, y as fractions of
        the side, and slices)."""
        return self.grader(crops, self.queries[targets.to(self.queries.device)])

    @torch.no_grad()
    def run(self, findings: Findings, store: SeriesStore) -> Grades:
        """Grade every located finding (a study's crops together); unreadable series are warned
        about once and their findings left ungraded."""
        device = self.queries.device
        log_probs = np.full((len(findings), NUM_CLASSES), np.nan)
        out = findings.replace()
        was_training = self.training
        self.eval()
        try:
            for study_id, rows in findings.by_study(findings.located):
                for series_id in np.unique(findings.series_id[rows]):
                    group = rows[findings.series_id[rows] == series_id]
                    series = store.find(study_id, int(series_id), "graded")
                    if series is None:
                        continue
                    index = np.array([series.instance_to_index.get(int(i), -1) for i in findings.instance_number[group]])
                    group, slices = group[index >= 0], index[index >= 0]
                    if not len(group):
                        continue
                    targets = torch.from_numpy(findings.target[group])
                    points = np.stack([findings.x[group], findings.y[group]], axis=1)
                    crops, slices, points = self._recentred_crops(series, slices, points, targets)
                    logits = self(crops.to(device), targets)["logits"].float()
                    log_probs[group] = logits.log_softmax(-1).cpu().numpy()
                    out.x[group], out.y[group] = points[:, 0], points[:, 1]
                    out.instance_number[group] = series.instance_numbers[slices]
        finally:
            self.train(was_training)
        return Grades(log_probs, out)

    @torch.no_grad()
    def with_context(self, grades: Grades) -> np.ndarray:
        """Probabilities ``[N, 3]`` of the graded findings after the study context (each study read
        together); NaN where not graded."""
        probs = np.exp(grades.log_probs)
        if self.study_context is None or not grades.graded.any():
            return probs
        rows = np.flatnonzero(grades.graded)
        findings = grades.findings
        log_probs = torch.from_numpy(grades.log_probs[rows]).float()
        levels = torch.from_numpy(findings.target[rows] % len(LEVELS))
        studies = torch.from_numpy(findings.study_id[rows])
        probs[rows] = self.study_context.cpu()(log_probs, levels, studies).softmax(-1).double().numpy()
        return probs

    def _recentred_crops(self, series: Series, slices: np.ndarray, points: np.ndarray,
                         targets: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Crops of one series at (slice, x, y), moved ``config.refine`` times by the offset head;
        returns ``(crops [N, C, size, size], slices, points)`` at the final positions."""
        cfg = self.config
        volume = torch.from_numpy(series.volume)
        offsets = range(-cfg.context, cfg.context + 1)
        side_px = np.array([cfg.side_mm / series.pixel_spacing[1], cfg.side_mm / series.pixel_spacing[0]])

        def cut(slices: np.ndarray, points: np.ndarray) -> torch.Tensor:
            return torch.stack([crop_roi(volume, series.pixel_spacing, k, x, y, cfg.side_mm, cfg.size, offsets)
                                for k, (x, y) in zip(slices, points, strict=True)])

        crops = cut(slices, points)
        for _ in range(int(cfg.refine)):
            offset = self(crops.to(self.queries.device), targets)["offset"].float().cpu().numpy()
            points = points + offset[:, :2] * side_px
            slices = np.clip(slices + np.rint(offset[:, 2]).astype(np.int64), 0, len(volume) - 1)
            crops = cut(slices, points)
        return crops, slices, points
