"""Stage "grade": severity from 2.5D crops of the original slices at each located finding.

For every located finding the stage cuts a crop of the original slices (``spinemm.data.roi``,
``config.side_mm`` wide), re-centres it ``config.refine`` times with the grader's offset head
(x, y and slice), grades it (the mean of the probabilities read at every pass), and lets its
:class:`~spinemm.models.grader.StudyContext` (when it has one) weigh each grade with the rest of
the study.

The grader (``config.backbone``):

- ``"clip"``: :class:`~spinemm.models.crop_grader.CropGrader`, the stage's own SpineCLIP dual
  encoder (``encoder``; when its vision tower is pretraining's, ``spinemm.zero_shot_classify``
  reads the same towers): the finding's metadata text (:func:`~spinemm.text.finding_text`, from
  the series it was located in) attends to the crop's tokens;
- ``"cnn"`` (or a timm name): :class:`~spinemm.models.grader.ROIGrader`, a ConvNet modulated by one
  constant embedding per label column.

Either way the stage needs no other model at run time.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..constants import LEVELS, NUM_CLASSES
from ..data.roi import crop_rois
from ..data.sides import folded_targets, mirror_crops, mirror_offsets
from ..data.store import SeriesStore
from ..errors import SpineModelError
from ..models.config import GraderConfig
from ..models.crop_grader import CropGrader
from ..models.factory import load_model
from ..models.grader import ROIGrader, StudyContext
from ..models.names import PIPELINE_CONFIG
from ..models.saved import check_finite
from ..models.spine_clip import SpineCLIP
from ..text import finding_texts
from .findings import Findings
from .stage import Stage, StageInput, StageOutput, stage_config

__all__ = ["GradeStage", "GradeEnsemble", "Grades"]

WEIGHTS = "grade.safetensors"
ENCODER_DIR = "grade"  # the clip grader's SpineCLIP, a model folder inside the pipeline folder
ENCODER_PREFIX = "grader.encoder."
MEMBERS_DIR = "grade-members"  # an ensemble's members, one pipeline-like folder each (0/, 1/, ...)


class Grades:
    """What the grade stage returns for a record of N findings."""

    def __init__(self, log_probs: np.ndarray, findings: Findings) -> None:
        self.log_probs = log_probs  # float64 [N, 3]: without the study context; NaN where not graded
        self.findings = findings  # the re-centred points (unchanged where not graded)

    @property
    def graded(self) -> np.ndarray:
        return ~np.isnan(self.log_probs[:, 0])


class GradeStage(Stage):
    """The ROI grader as a pipeline stage (config: :class:`~spinemm.models.config.GraderConfig`)."""

    name = "grade"
    config_class = GraderConfig

    def __init__(self, config: GraderConfig | None = None, query_dim: int = 256,
                 encoder: SpineCLIP | None = None) -> None:
        super().__init__(config)
        self.query_dim = int(query_dim)
        if self.config.backbone == "clip":
            if encoder is None:
                raise SpineModelError("the clip grade stage needs its encoder: GradeStage(config, encoder=model)")
            self.grader: torch.nn.Module = CropGrader(encoder, self.config, NUM_CLASSES)
        else:
            self.grader = ROIGrader(self.config, self.query_dim, NUM_CLASSES)
        self.study_context = StudyContext(NUM_CLASSES) if self.config.study_context else None

    @property
    def encoder(self) -> SpineCLIP | None:
        """The dual encoder the ``"clip"`` grader reads crops and texts with (None for a CNN)."""
        return self.grader.encoder if isinstance(self.grader, CropGrader) else None

    def config_dict(self) -> dict:
        return {**asdict(self.config), "query_dim": self.query_dim}

    def text_towers(self) -> list[torch.nn.Module]:
        return [self.encoder.text] if self.encoder is not None and getattr(self.encoder, "text", None) is not None \
            else []

    def run(self, inputs: StageInput) -> StageOutput:
        """Grades (after the study context) where the stage graded; NaN rows keep earlier probabilities."""
        grades = self.grade(inputs.findings, inputs.store)
        return StageOutput(grades.findings, self.with_context(grades), {"log_probs": grades.log_probs})

    def compile_models(self, **options) -> None:
        """The grader and study context under ``torch.compile(fullgraph=True)`` (in place); the
        text tower that encodes the queries stays eager."""
        self.grader.compile(fullgraph=True, **options)
        if self.study_context is not None:
            self.study_context.compile(fullgraph=True, **options)

    def save(self, folder: Path) -> dict:
        """``grade.safetensors`` (and, for the clip grader, its encoder as ``grade/``, a folder
        ``spinemm.load_model`` reads) in a pipeline folder; returns the ``pipeline.json`` section."""
        from safetensors.torch import save_file

        state = self.state_dict()
        if self.encoder is not None:
            self.encoder.save_pretrained(folder / ENCODER_DIR)
            state = {k: v for k, v in state.items() if not k.startswith(ENCODER_PREFIX)}
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(folder / WEIGHTS))
        return self.config_dict()

    @classmethod
    def load(cls, folder: Path, section: dict) -> GradeStage:
        """The stage :meth:`save` wrote in ``folder``; a file that is not safetensors, or whose
        tensors do not fit, raises :class:`SpineModelError` naming it. A section listing
        ``members`` is an ensemble's (:class:`GradeEnsemble`)."""
        if "members" in section:
            return GradeEnsemble.load(folder, section)
        values = dict(section)
        query_dim = values.pop("query_dim", 256)
        if isinstance(query_dim, bool) or not isinstance(query_dim, int) or not 1 <= query_dim <= 8192:
            raise SpineModelError(f"{folder / PIPELINE_CONFIG}: grade.query_dim must be an integer in 1..8192, "
                                  f"got {query_dim!r}")
        config = stage_config(GraderConfig, values, folder, cls.name)
        try:
            stage = cls._load(Path(folder), config, query_dim)
        except SpineModelError as err:  # e.g. a backbone no registry knows: say which file asked for it
            raise SpineModelError(err if str(folder) in str(err) else f"{folder / PIPELINE_CONFIG}: grade: {err}") \
                from None
        check_finite(stage, folder / WEIGHTS)
        return stage

    @classmethod
    def _load(cls, folder: Path, config: GraderConfig, query_dim: int) -> GradeStage:
        from safetensors.torch import load_file

        weights = folder / WEIGHTS
        if not weights.is_file():
            raise SpineModelError(f"{weights} is missing: the pipeline folder lists stage 'grade'")
        encoder = load_model(folder / ENCODER_DIR) if config.backbone == "clip" else None
        stage = cls(config, query_dim, encoder=encoder)
        try:
            state = load_file(str(weights))
        except Exception as err:  # safetensors' own error types: not a safetensors file
            raise SpineModelError(f"cannot load {weights}: {type(err).__name__}: {err}") from None
        try:
            missing, unexpected = stage.load_state_dict(state, strict=False)
        except RuntimeError as err:  # wrong shapes
            raise SpineModelError(f"cannot load {weights}: {err}") from None
        missing = [k for k in missing if not k.startswith(ENCODER_PREFIX)]
        if missing or unexpected:
            raise SpineModelError(f"{weights} does not fit its GraderConfig: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        return stage

    def forward(self, crops: torch.Tensor, targets: torch.Tensor, texts: list[str] | None = None,
                queries: torch.Tensor | None = None, text_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Crops ``[N, 1 + 2 context, size, size]`` for label columns ``targets [N]`` (and their
        :func:`~spinemm.text.finding_text` s, or their ``queries``) -> ``{"logits": [N, 3],
        "offset": [N, 3]}`` (the finding's offset from the crop centre: x, y as fractions of the
        side, and slices). ``text_features``: the clip grader's precomputed text features
        (:meth:`~spinemm.models.crop_grader.CropGrader.forward`), for a frozen text tower."""
        if text_features is not None:
            return self.grader(crops, targets, texts, queries, text_features=text_features)
        return self.grader(crops, targets, texts, queries)

    @torch.no_grad()
    def grade(self, findings: Findings, store: SeriesStore, batch_size: int = 64) -> Grades:
        """Grade every located finding: all crops of the record are cut, re-centred and graded in
        batches of ``batch_size`` (on a 2-core VM, 64 of the tiny preset's 32 px crops ran 15-25%
        faster per crop than 16 or 256, on 1 thread and on 2). Unreadable series are warned about
        once and their findings left ungraded."""
        log_probs = np.full((len(findings), NUM_CLASSES), np.nan)
        out = findings.replace()
        parts = []  # (series, rows of the record, slice indices) for every readable series
        for study_id, rows in findings.by_study(findings.located):
            for series_id in np.unique(findings.series_id[rows]):
                group = rows[findings.series_id[rows] == series_id]
                series = store.find(study_id, int(series_id), "graded")
                if series is None:
                    continue
                index = np.array([series.instance_to_index.get(int(i), -1) for i in findings.instance_number[group]])
                if (index >= 0).any():
                    parts.append((series, group[index >= 0], index[index >= 0]))
        if not parts:
            return Grades(log_probs, out)
        rows = np.concatenate([group for _, group, _ in parts])
        targets = torch.from_numpy(self._read_as(findings.target[rows]))
        texts = [text for series, group, _ in parts for text in finding_texts(series, self._read_as(findings.target[group]))]
        device = next(self.grader.parameters()).device
        slices = [k for _, _, k in parts]
        points = [np.stack([findings.x[group], findings.y[group]], axis=1) for _, group, _ in parts]
        was_training = self.training
        self.eval()
        try:
            queries = self.grader.encode_queries(texts, targets.to(device))  # each distinct text once
            refine = int(self.config.refine)
            probs = torch.zeros(len(rows), NUM_CLASSES, dtype=torch.float64)
            for step in range(refine + 1):
                crops = self._cut(parts, slices, points)
                if self.config.fold_sides:  # right findings read mirrored, as their left twins
                    crops = mirror_crops(crops, findings.target[rows])
                out_pass = self._batched(crops, targets, queries, batch_size)
                probs += out_pass["logits"].softmax(-1).double()
                if step < refine:  # re-centre on the offset head's estimate (back in the series' frame)
                    offset = mirror_offsets(out_pass["offset"], findings.target[rows]) if self.config.fold_sides \
                        else out_pass["offset"]
                    slices, points = self._moved(parts, slices, points, offset)
        finally:
            self.train(was_training)
        # the grade is the mean over the passes (the located crop and each re-centred one): a free
        # ensemble, 0.006-0.007 better on 240 held-out studies than the last pass alone (RESULTS.md)
        log_probs[rows] = (probs / (refine + 1)).log().numpy()
        moved = np.concatenate(points)
        out.x[rows], out.y[rows] = moved[:, 0], moved[:, 1]
        out.instance_number[rows] = np.concatenate([s.instance_numbers[k] for (s, _, _), k in zip(parts, slices,
                                                                                                   strict=True)])
        return Grades(log_probs, out)

    @torch.no_grad()
    def attention(self, graded: Findings, store: SeriesStore, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """What the clip grader looked at, for findings ``rows`` of a graded record (the run's
        ``result.graded``, whose points are where the final grades were read): ``{"crops": [N, C,
        size, size], "attention": [N, slices, h, w] (the last layer's cross-attention of the
        query over the crop's tokens), "pooled": [N] (its weight on the pooled embedding),
        "log_probs": [N, 3] (the grader's read of these crops, without the study context; the stage's
        grade is the mean of such reads over its passes, so ``attention(result.located, ...)`` shows
        the first pass and ``attention(result.graded, ...)`` the last)}``."""
        if not isinstance(self.grader, CropGrader):
            raise SpineModelError("attention maps need the clip grader (grader.backbone='clip'); "
                                  f"this stage's grader is {type(self.grader).__name__}")
        rows = np.asarray(rows, dtype=np.int64)
        parts = []
        for row in rows:
            series = store.get(int(graded.study_id[row]), int(graded.series_id[row]))
            parts.append((series, row[None], np.array([series.instance_to_index[int(graded.instance_number[row])]])))
        points = [np.array([[graded.x[row], graded.y[row]]]) for row in rows]
        crops = self._cut(parts, [k for _, _, k in parts], points)
        if self.config.fold_sides:
            crops = mirror_crops(crops, graded.target[rows])
        targets = torch.from_numpy(self._read_as(graded.target[rows]))
        texts = [text for series, group, _ in parts for text in finding_texts(series, self._read_as(graded.target[group]))]
        device = next(self.grader.parameters()).device
        was_training = self.training
        self.eval()
        try:
            queries = self.grader.encode_queries(texts, targets.to(device))
            out = self.grader(crops.to(device), targets.to(device), queries=queries, need_attention=True)
        finally:
            self.train(was_training)
        last = out["attention"][:, -1].float().cpu()  # [N, 1 + T]
        return {"crops": crops, "attention": last[:, 1:].unflatten(-1, self.grader.token_grid()),
                "pooled": last[:, 0], "log_probs": out["logits"].float().log_softmax(-1).cpu()}

    def _read_as(self, targets: np.ndarray) -> np.ndarray:
        """The label columns the grader reads findings ``targets`` as: each right-sided one as its
        left twin when the stage folds sides (``GraderConfig.fold_sides``), else themselves."""
        return folded_targets(targets)[0] if self.config.fold_sides else np.asarray(targets)

    def _cut(self, parts: list, slices: list[np.ndarray], points: list[np.ndarray]) -> torch.Tensor:
        """The crops of every part at its (slice, x, y), concatenated: ``[N, 1 + 2 context, size, size]``."""
        cfg = self.config
        offsets = range(-cfg.context, cfg.context + 1)
        return torch.cat([crop_rois(torch.from_numpy(series.volume), series.pixel_spacing, ks, xys[:, 0], xys[:, 1],
                                    cfg.side_mm, cfg.size, offsets)
                          for (series, _, _), ks, xys in zip(parts, slices, points, strict=True)])

    def _moved(self, parts: list, slices: list[np.ndarray], points: list[np.ndarray],
               offset: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Slices and points moved by the offset head's output (x, y in crop sides, slices)."""
        offset, start = offset.numpy(), 0
        new_slices, new_points = [], []
        for (series, _, _), ks, xys in zip(parts, slices, points, strict=True):
            part = offset[start:start + len(ks)]
            start += len(ks)
            side_px = np.array([self.config.side_mm / series.pixel_spacing[1], self.config.side_mm / series.pixel_spacing[0]])
            new_points.append(xys + part[:, :2] * side_px)
            new_slices.append(np.clip(ks + np.rint(part[:, 2]).astype(np.int64), 0, len(series.volume) - 1))
        return new_slices, new_points

    def _batched(self, crops: torch.Tensor, targets: torch.Tensor, queries: torch.Tensor,
                 batch_size: int) -> dict[str, torch.Tensor]:
        """The grader's outputs (float32, on the CPU) over ``crops`` in batches of ``batch_size``."""
        device = queries.device
        outs = [self(crops[i:i + batch_size].to(device), targets[i:i + batch_size], queries=queries[i:i + batch_size])
                for i in range(0, len(crops), batch_size)]
        return {key: torch.cat([o[key].float().cpu() for o in outs]) for key in ("logits", "offset")}

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


class GradeEnsemble(Stage):
    """Several grade stages (study-level folds and/or training seeds) read as one: each member
    grades the same located findings and the ensemble's probabilities are their mean, after each
    member's own study context (as the top RSNA 2024 solutions averaged folds and seeds). The
    points passed on are the first member's re-centred ones. Saved as ``grade-members/K/`` folders
    beside a ``pipeline.json`` section ``{"members": [each member's section]}``."""

    name = "grade"

    def __init__(self, members: list[GradeStage]) -> None:
        super().__init__()
        if not members:
            raise SpineModelError("a grade ensemble needs at least one member")
        self.members = torch.nn.ModuleList(members)

    # what readers of a grade stage look at (the report's attention maps, the card): the first member's
    @property
    def config(self) -> GraderConfig:
        return self.members[0].config

    @property
    def grader(self) -> torch.nn.Module:
        return self.members[0].grader

    @property
    def encoder(self) -> SpineCLIP | None:
        return self.members[0].encoder

    @property
    def study_context(self) -> StudyContext | None:
        return self.members[0].study_context

    def attention(self, graded: Findings, store: SeriesStore, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The first member's attention maps (:meth:`GradeStage.attention`)."""
        return self.members[0].attention(graded, store, rows)

    def text_towers(self) -> list[torch.nn.Module]:
        return [tower for member in self.members for tower in member.text_towers()]

    def compile_models(self, **options) -> None:
        for member in self.members:
            member.compile_models(**options)

    def run(self, inputs: StageInput) -> StageOutput:
        outs = [member.run(inputs) for member in self.members]
        probs = np.mean([out.probs for out in outs], axis=0)
        log_probs = np.log(np.mean([np.exp(out.extras["log_probs"]) for out in outs], axis=0))
        return StageOutput(outs[0].findings, probs, {"log_probs": log_probs})

    def save(self, folder: Path) -> dict:
        sections = []
        for k, member in enumerate(self.members):
            sub = Path(folder) / MEMBERS_DIR / str(k)
            sub.mkdir(parents=True, exist_ok=True)
            sections.append(member.save(sub))
        return {"members": sections}

    @classmethod
    def load(cls, folder: Path, section: dict) -> GradeEnsemble:
        members = section["members"]
        if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
            raise SpineModelError(f"{folder / PIPELINE_CONFIG}: grade.members must be a non-empty list of "
                                  f"grade sections, got {members!r}")
        return cls([GradeStage.load(Path(folder) / MEMBERS_DIR / str(k), m) for k, m in enumerate(members)])
