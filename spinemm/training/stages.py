"""Train the pipeline's stages after detect, in order, and save the pipeline as one folder.

``train_stages(config)`` is what ``recipes/train_stages.py`` runs. ``init_from`` names the detect
stage (``train_detect``'s ``best/`` or ``model/``) or a pipeline folder whose stages are kept
unless retrained. ``pipeline.stages`` lists the stages to train (``[locate, grade]`` by default):
``locate`` first, because the grader is selected, and its study context fitted, at the points the
pipeline will predict: each stage trains with the stages before it (``SpinePipeline.before``), and
a kept stage after it is kept as it was. A new stage is made trainable by :func:`register_trainer`.
Outputs under ``pipeline.output_dir``::

    config.yaml      the resolved config
    locate/, grade/  each stage's engine run: checkpoint-STEP/, best.safetensors, tensorboard/
    pipeline/        the trained pipeline (spinemm.load_pipeline reads it)
    metrics.json     per-stage history and validation metrics
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import SpineModelError
from ..files import write_atomic
from ..pipeline.grade import GradeStage
from ..pipeline.locate import LocateStage
from ..pipeline.pipeline import SpinePipeline, load_pipeline
from ..pipeline.registry import register_stage, registered_stages
from ..pipeline.stage import Stage
from .common import model_card, start_run
from .config import DEFAULTS, load_config
from .grade_ensemble import train_grade_stage
from .locate import train_locate

__all__ = ["train_stages", "parse_stages", "register_trainer", "trainable_stages", "Trainer"]

#: ``trainer(config, run, pipeline, output_dir, progress) -> {"stage", "history", "metrics", ...}``:
#: trains one stage (through the engine: ``training.stage_fit.fit_stage``) for ``pipeline`` (the
#: stages before it, trained and frozen) on ``run``'s studies; ``stage`` is None if it stopped early.
Trainer = Callable[[dict[str, Any], Any, SpinePipeline, Path, bool], dict[str, Any]]

_TRAINERS: dict[str, Trainer] = {}


def register_trainer(stage: type[Stage], trainer: Trainer, section: str | None = None,
                     defaults: dict[str, Any] | None = None) -> None:
    """Make ``stage`` trainable by ``train_stages`` (and loadable: it is registered as a pipeline
    stage too). ``section`` / ``defaults``: the recipe config section its trainer reads, added to
    the recipe keys (so ``section.epochs=3`` is checked, and shown by ``--help``)."""
    register_stage(stage)
    if section is not None:
        if section in DEFAULTS and DEFAULTS[section] != defaults:
            raise SpineModelError(f"recipe config section {section!r} already exists")
        DEFAULTS[section] = dict(defaults or {})
    _TRAINERS[stage.name] = trainer


def trainable_stages() -> list[str]:
    """The stages ``train_stages`` can train, in pipeline order."""
    return [name for name in registered_stages() if name in _TRAINERS]


def parse_stages(value: Any) -> list[str]:
    """``[locate, grade]`` or ``"locate,grade"`` -> the stage names, validated, in pipeline order."""
    names = [s.strip() for s in value.split(",")] if isinstance(value, str) else [str(s) for s in (value or [])]
    unknown = sorted(set(names) - set(trainable_stages()))
    if unknown or not names:
        raise SpineModelError(f"pipeline.stages must list some of {trainable_stages()}, got {value!r}")
    return [name for name in trainable_stages() if name in names]


def train_stages(config: dict[str, Any] | str | Path | None = None, overrides: Any = ()) -> dict[str, Any]:
    """Train ``pipeline.stages`` on top of ``init_from``; returns ``{"output_dir", "pipeline_dir",
    "stages": {name: {"history", "metrics"}}, "stopped"}`` (``pipeline_dir`` None when a stage
    stopped early through its ``stop_at_step``). Every process must call it under ``accelerate launch``."""
    config = load_config(config, overrides)
    if not config["init_from"]:
        raise SpineModelError("train_stages needs init_from: the detect model (train_detect's output_dir/best "
                              "or output_dir/model) or a pipeline folder")
    names = parse_stages(config["pipeline"]["stages"])
    output_dir = Path(config["pipeline"]["output_dir"])
    run = start_run({**config, "output_dir": str(output_dir)}, model=False)
    progress = bool(config["log"]["progress"]) and run.accelerator.is_main_process
    pipeline = load_pipeline(config["init_from"])
    for stage in pipeline.stages:  # the stages before the one training are frozen: dropout off
        stage.requires_grad_(False)
        stage.eval()
    result: dict[str, Any] = {"output_dir": output_dir, "pipeline_dir": None, "stages": {}, "stopped": False}
    for name in names:  # each stage is trained, and selected, at the points of the stages before it
        trained = _TRAINERS[name](config, run, pipeline.before(name), output_dir / name, progress)
        result["stages"][name] = {"history": trained["history"], "metrics": trained["metrics"]}
        if trained["stage"] is None:
            result["stopped"] = True
            return result
        trained["stage"].requires_grad_(False)
        pipeline.set_stage(trained["stage"].eval())
    if run.accelerator.is_main_process:
        metrics = {f"{name} {key}": value for name, stage in result["stages"].items()
                   for key, value in (stage["metrics"] or {}).items()}
        pipeline.save_pretrained(output_dir / "pipeline", model_card_kwargs=model_card(run, metrics))
        summary = {"stages": result["stages"], "pipeline_stages": pipeline.stage_names,
                   "train_studies": len(run.train_ids), "val_studies": len(run.val_ids)}
        write_atomic(output_dir / "metrics.json", json.dumps(summary, indent=2, default=str).encode())
    run.accelerator.wait_for_everyone()
    result["pipeline_dir"] = output_dir / "pipeline"
    return result


def _train_locate(config: dict[str, Any], run: Any, pipeline: SpinePipeline, output_dir: Path,
                  progress: bool) -> dict[str, Any]:
    return train_locate(config, run, output_dir, progress)  # trained from scratch on the label points


register_trainer(LocateStage, _train_locate)
register_trainer(GradeStage, train_grade_stage)  # one grader, or an ensemble (grader.folds / seeds)
