"""Train the grade stage (``spinemm.pipeline.GradeStage``) on crops of the original slices.

The grader learns on :class:`~spinemm.data.roi.ROIWindows` at the training studies' label points,
each crop shifted at random by up to ``grader.shift`` of its side and ``grader.slice_jitter``
slices (about the earlier stages' location error), so it tolerates the points it will be given. It
is conditioned on each label column's query embedding from the detect stage's text tower (frozen,
kept with the stage). Training runs through the engine (:mod:`.stage_fit`).

Model selection is by the score that ships: every ``grader.eval_every_epochs`` the pipeline as it
stands (detect, locate when present, this grader) predicts the validation studies at their
PREDICTED points, and the epoch ending the best run of ``grader.select_window`` such official scores
(by their mean) is kept. Then the study context is fitted on those validation
grades (:mod:`.study_context`); its reported score is cross-fitted over the studies.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ..constants import NUM_TARGETS
from ..data.roi import ROIWindows
from ..errors import SpineModelError
from ..losses import weighted_cross_entropy
from ..metrics import classification_report, rsna_score, solution_frame
from ..models.config import GraderConfig, config_from_dict
from ..models.lora import add_lora, merge_lora, resolve_targets
from ..pipeline.grade import GradeStage
from ..pipeline.pipeline import SpinePipeline
from ..pipeline.result import PipelineResult, submission_from_probs
from .label_check import without_contradicted
from .stage_fit import epoch_generator, fit_stage
from .study_context import cross_fitted, fit_study_context, val_grades

# L1 weights of the offset (x, y in fractions of the crop side, ~0.1; slice in slices, ~1), which
# put each on about the footing of the cross-entropy.
OFFSET_WEIGHTS = (10.0, 10.0, 1.0)


class GraderSamples(Dataset):
    """Items of :class:`~spinemm.data.roi.ROIWindows` at random shifts: ``{"crops", "offset",
    "label", "target", "texts"}``. Each epoch's shifts are drawn at once by :meth:`set_epoch` from a
    generator seeded with ``(seed, epoch)`` (never the global RNG, so a resumed run repeats), and a
    batch is cut in one gather (``__getitems__``). ``text_features``: the frozen text tower's
    features of each distinct text and each window's row in them
    (:meth:`~spinemm.models.crop_grader.CropGrader.text_features`); items then carry their
    ``"text_features"`` in place of ``"texts"``."""

    def __init__(self, windows: ROIWindows, seed: int = 0,
                 text_features: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.windows, self.seed = windows, int(seed)
        self.text_features = text_features
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.shifts = self.windows.draw_shifts(len(self.windows), epoch_generator(self.seed, self.epoch))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch, already stacked (``stage_fit.batch_collate`` passes it through)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        crops, offset = self.windows.crops(index, shifts=self.shifts[index])
        batch = {"crops": crops, "offset": offset, "label": self.windows.labels[index],
                 "target": self.windows.targets[index]}
        if self.text_features is None:
            batch["texts"] = [self.windows.texts[i] for i in indices]
        else:
            features, rows = self.text_features
            batch["text_features"] = features[rows[index]]
        return batch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] if isinstance(v, torch.Tensor) else v for k, v in self.__getitems__([int(index)]).items()}


def offset_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(OFFSET_WEIGHTS, dtype=predicted.dtype, device=predicted.device)
    return ((predicted - target).abs() * weights).sum(-1).mean()


def grade_step(stage: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """batch -> (weighted cross-entropy + offset loss, parts) for the engine."""
    out = stage(batch["crops"], batch["target"], batch.get("texts"), text_features=batch.get("text_features"))
    severity = weighted_cross_entropy(out["logits"], batch["label"])
    offset = offset_loss(out["offset"], batch["offset"])
    return severity + offset, {"severity_loss": severity, "offset_loss": offset}


def val_solution(frame: pd.DataFrame, study_ids: list[int]) -> pd.DataFrame:
    """Kaggle solution frame of ``study_ids`` from a :func:`~spinemm.data.load_tables` frame."""
    labels = np.full((len(study_ids), NUM_TARGETS), -1, dtype=np.int64)
    position = {s: i for i, s in enumerate(study_ids)}
    rows = frame[frame["study_id"].isin(study_ids)]
    labels[rows["study_id"].map(position).to_numpy(), rows["target"].to_numpy()] = rows["label"].to_numpy()
    return solution_frame(study_ids, labels)


class ValidationRun:
    """The validation studies as the pipeline sees them before grading (detect + locate, run once),
    scored with any grade stage at their predicted points."""

    def __init__(self, pipeline: SpinePipeline, run: Any, progress: bool = True) -> None:
        self.before: PipelineResult = pipeline.run(run.root, "train", study_ids=run.val_ids, store=run.store,
                                                   progress=progress)
        self.store, self.frame = run.store, run.frame
        self.solution = val_solution(run.frame, self.before.study_ids)

    def score(self, probs: np.ndarray) -> float:
        """Official score of probabilities ``[B * 25, 3]`` (NaN rows: the detect stage's)."""
        detect = self.before.detect_probs.reshape(-1, 3)
        merged = np.where(np.isnan(probs), detect, probs).reshape(len(self.before.study_ids), NUM_TARGETS, 3)
        return rsna_score(self.solution, submission_from_probs(self.before.study_ids, merged))

    def evaluate(self, stage: GradeStage) -> dict[str, float]:
        grades = stage.grade(self.before.findings, self.store)
        return {"score": self.score(np.exp(grades.log_probs)), "graded_rows": int(grades.graded.sum())}


def train_grade(config: dict[str, Any], run: Any, pipeline: SpinePipeline, output_dir: Path,
                progress: bool = True) -> dict[str, Any]:
    """Train a fresh grade stage (``grader.model``: :class:`GraderConfig` fields) for ``pipeline``
    (detect, and locate when it has one); returns ``{"stage", "state", "history", "metrics"}``
    where metrics holds the val official scores at predicted points of the pipeline without this
    stage (``before_score``), with it but no study context (``grader_score``) and with both
    (``score``, cross-fitted); ``stage`` is None if the run stopped early."""
    options = config["grader"]
    stage = build_grade_stage(config, pipeline.detect.model)
    cfg = stage.config
    window_args = {"side_mm": cfg.side_mm, "size": cfg.size, "context": cfg.context, "progress": progress,
                   "store": run.store, "fold_sides": cfg.fold_sides}
    train_frame, dropped = without_contradicted(run.frame, options)  # the label check (null: every label)
    train_set = ROIWindows(run.root, train_frame, run.train_ids, shift=float(options["shift"]),
                           slice_jitter=int(options["slice_jitter"]), **window_args)
    if len(train_set) == 0:
        raise SpineModelError(f"no labelled coordinates in the {len(run.train_ids)} training studies under {run.root}")
    val = ValidationRun(pipeline, run, progress) if run.val_ids else None

    def eval_fn(module: torch.nn.Module) -> dict[str, float]:
        return val.evaluate(module) if val is not None else {"score": math.nan}

    samples = GraderSamples(train_set, int(config["train"]["seed"]), _frozen_text_features(stage, train_set.texts))
    state, _ = fit_stage(config, "grader", stage, samples, grade_step, eval_fn, output_dir,
                         params=_param_groups(stage, options))
    if getattr(stage.encoder, "lora_config", None) is not None and not state.stopped:
        merge_lora(stage.encoder)  # the pipeline folder holds a plain encoder that load_model reads
    trained_rate = state.timed_studies / state.train_seconds if state.train_seconds > 0 else math.nan
    result: dict[str, Any] = {"stage": None if state.stopped else stage, "state": state, "history": state.history,
                              "metrics": {"train_rows": len(train_set), "skipped_rows": train_set.skipped,
                                          "dropped_labels": dropped,
                                          "train_crops_per_s": trained_rate,
                                          "trainable_params": sum(p.numel() for p in stage.parameters()
                                                                  if p.requires_grad)}}
    if state.stopped or val is None:
        return result
    result["metrics"].update(_fit_context(stage, val))
    result["val"] = val  # the validation studies as graded: an ensemble reads its out-of-fold grades here
    return result


def build_grade_stage(config: dict[str, Any], detect: torch.nn.Module) -> GradeStage:
    """A fresh grade stage from ``grader.model``. The clip grader's encoder is a trainable copy of
    ``grader.towers_from`` (a saved model folder, e.g. contrastive pretraining's, so the grader reads
    the features zero-shot scoring reads) or of the detect model, with LoRA on its towers when
    ``lora.r > 0``; ``grader.towers`` (``create_model`` overrides, e.g. another ``vision`` section)
    swaps in a freshly built vision tower and keeps that text tower, for the backbone comparison.
    The CNN grader takes the detect model's 25 query embeddings, once."""
    options = config["grader"]
    model_config = config_from_dict(GraderConfig, options["model"] or {}, "grader.model.")
    if model_config.backbone != "clip":
        stage = GradeStage(model_config, query_dim=detect.config.fusion.dim)
        with torch.no_grad():
            stage.grader.query_table.copy_(detect.encode_queries(None, 1)[0].float().cpu())  # frozen text tower
        return stage
    encoder = _grader_encoder(config, detect, model_config.size)
    encoder.requires_grad_(True)
    lora = config["lora"]
    if int(lora["r"]) > 0:
        add_lora(encoder, r=int(lora["r"]), alpha=lora["alpha"], dropout=lora["dropout"],
                 targets=_lora_targets(encoder, lora["targets"], fresh_vision=bool(options["towers"])))
    if not options["train_text"]:
        encoder.text.requires_grad_(False)  # adapters included: the tower stays as towers_from has it
    elif options["text_dropout"] is not None:
        set_dropout(encoder.text, float(options["text_dropout"]))
    return GradeStage(model_config, query_dim=encoder.config.fusion.dim, encoder=encoder.train())


def set_dropout(module: torch.nn.Module, p: float) -> None:
    """Set the probability of every ``nn.Dropout`` in ``module`` (BERT's attention dropout reads its
    module's ``p`` too), except LoRA adapters' own (peft's ``lora_dropout``: ``lora.dropout``)."""
    if not 0.0 <= p < 1.0:
        raise SpineModelError(f"grader.text_dropout must be in [0, 1), got {p}")
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Dropout) and "lora_dropout" not in name:
            m.p = p


@torch.no_grad()
def _frozen_text_features(stage: GradeStage, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The frozen text tower's features of each distinct training text (in eval mode, once) and
    each window's row in them; None when the text tower trains or the grader reads no text."""
    grader = stage.grader
    if stage.encoder is None or getattr(grader, "query_proj", None) is None:
        return None
    if any(p.requires_grad for p in stage.encoder.text.parameters()):
        return None
    was_training = stage.training
    stage.eval()
    try:
        features, rows = grader.text_features(texts)
    finally:
        stage.train(was_training)
    return features.float().cpu(), rows


def _lora_targets(encoder: Any, targets: Any, fresh_vision: bool) -> Any:
    """``lora.targets`` for the grader's encoder; a fresh vision tower (``grader.towers``) has
    nothing pretrained to adapt, so it trains in full (``None``) and only the text tower gets LoRA."""
    if not fresh_vision:
        return "auto" if targets is None else targets
    if isinstance(targets, dict):
        return {**targets, "vision": None}
    if targets is None or targets == "auto":
        found = resolve_targets(encoder.text)
        return {"vision": None, "text": found[1] if found else None}
    return {"vision": None, "text": targets}


def _grader_encoder(config: dict[str, Any], detect: torch.nn.Module, size: int) -> Any:
    import copy

    from ..models.factory import create_model, load_model

    options = config["grader"]
    source = load_model(options["towers_from"]) if options["towers_from"] else copy.deepcopy(detect)
    if not options["towers"]:
        return source
    try:
        towers = dict(options["towers"])
        towers["vision"] = {"image_size": size, **dict(towers.get("vision") or {})}  # the crops' size
        fresh = create_model(config["model"]["name"], pretrained=False, **towers)
        fresh.text.load_state_dict(source.text.state_dict())  # the same text side for every vision tower
        fresh.query_proj.load_state_dict(source.query_proj.state_dict())
    except (TypeError, ValueError, RuntimeError) as err:
        raise SpineModelError(f"grader.towers: {err}") from None
    fresh.text.tokenizer = source.text.tokenizer  # a real preset's vocabulary comes with its weights
    return fresh


def _param_groups(stage: GradeStage, options: dict[str, Any]) -> list[dict[str, Any]]:
    """The pretrained towers at ``grader.tower_lr`` (LoRA adapters included), the rest at
    ``grader.lr``: the decoder, heads and projections, and a fresh vision tower (``grader.towers``)."""
    towers: set[int] = set()
    if stage.encoder is not None:
        fresh = {id(p) for p in stage.encoder.vision.parameters()} if options["towers"] else set()
        towers = {id(p) for p in stage.encoder.parameters()} - fresh
    trainable = [p for p in stage.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in towers], "lr": float(options["lr"])},
              {"params": [p for p in trainable if id(p) in towers], "lr": float(options["tower_lr"])}]
    return [g for g in groups if g["params"]]


def _fit_context(stage: GradeStage, val: ValidationRun) -> dict[str, Any]:
    """Val scores before this stage, with it, and with its study context (cross-fitted), which is
    then fitted on all val studies; the classification metrics and throughput are the grader's own
    (no study context), on the val findings."""
    tic = time.perf_counter()
    grades = stage.grade(val.before.findings, val.store)
    seconds = time.perf_counter() - tic
    scores: dict[str, Any] = {"before_score": val.score(np.full((len(grades.log_probs), 3), np.nan)),
                              "detect_score": rsna_score(val.solution, val.before.submission("detect")),
                              "grader_score": val.score(np.exp(grades.log_probs))}
    scores["score"] = scores["grader_score"]
    scores["eval_crops_per_s"] = int(grades.graded.sum()) * (1 + int(stage.config.refine)) / seconds
    labelled = val_grades(grades, val.frame)
    known = labelled.labels >= 0
    if known.any():
        report = classification_report(labelled.labels[known].numpy(), labelled.log_probs[known].numpy())
        scores.update({k: report[k] for k in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall")})
    if stage.study_context is not None and len(labelled.labels):
        probs = np.full_like(grades.log_probs, np.nan)
        probs[labelled.rows] = cross_fitted(labelled).numpy()
        scores["score"] = val.score(probs)
        fit_study_context(stage.study_context, labelled)
        fitted = {name: value.detach() for name, value in stage.study_context.named_parameters()}
        scores["study_context"] = {"log_temperature": float(fitted["log_temperature"]),
                                   "weight": fitted["mix.weight"].tolist(), "bias": fitted["mix.bias"].tolist()}
    return scores
