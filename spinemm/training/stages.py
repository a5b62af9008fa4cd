"""Train the pipeline's stages after detect, in order, and save the pipeline as one folder.

``train_stages(config)`` is what ``recipes/train_stages.py`` runs. ``init_from`` names the detect
stage (``train_detect``'s ``best/`` or ``model/``) or a pipeline folder whose stages are kept
unless retrained. ``pipeline.stages`` lists the stages to train (``[locate, grade]`` by default):
``locate`` first, because the grader is selected, and its study context fitted, at the points the
pipeline will predict. Outputs under ``pipeline.output_dir``::

    config.yaml      the resolved config
    locate/, grade/  each stage's engine run: checkpoint-STEP/, best.safetensors, tensorboard/
    pipeline/        the trained pipeline (spinemm.load_pipeline reads it)
    metrics.json     per-stage history and validation metrics
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import SpineModelError
from ..files import write_atomic
from ..pipeline.pipeline import STAGE_ORDER, load_pipeline
from .common import model_card, start_run
from .config import load_config
from .grade import train_grade
from .locate import train_locate

TRAINABLE = ("locate", "grade")


def parse_stages(value: Any) -> list[str]:
    """``[locate, grade]`` or ``"locate,grade"`` -> the stage names, validated, in pipeline order."""
    names = [s.strip() for s in value.split(",")] if isinstance(value, str) else [str(s) for s in (value or [])]
    unknown = sorted(set(names) - set(TRAINABLE))
    if unknown or not names:
        raise SpineModelError(f"pipeline.stages must list some of {list(TRAINABLE)}, got {value!r}")
    return [name for name in STAGE_ORDER if name in names]


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
    pipeline.detect.model.requires_grad_(False)
    pipeline.detect.model.eval()  # frozen: dropout off
    result: dict[str, Any] = {"output_dir": output_dir, "pipeline_dir": None, "stages": {}, "stopped": False}
    for name in names:
        if name == "locate":  # trained from scratch; a grade stage trained next is selected with it
            trained = train_locate(config, run, output_dir / "locate", progress)
        else:
            trained = train_grade(config, run, pipeline, output_dir / "grade", progress)
        result["stages"][name] = {"history": trained["history"], "metrics": trained["metrics"]}
        if trained["stage"] is None:
            result["stopped"] = True
            return result
        trained["stage"].requires_grad_(False)
        setattr(pipeline, name, trained["stage"].eval())
    if run.accelerator.is_main_process:
        metrics = {f"{name} {key}": value for name, stage in result["stages"].items()
                   for key, value in (stage["metrics"] or {}).items()}
        pipeline.save_pretrained(output_dir / "pipeline", model_card_kwargs=model_card(run, metrics))
        summary = {"stages": result["stages"], "pipeline_stages": pipeline.stages,
                   "train_studies": len(run.train_ids), "val_studies": len(run.val_ids)}
        write_atomic(output_dir / "metrics.json", json.dumps(summary, indent=2, default=str).encode())
    run.accelerator.wait_for_everyone()
    result["pipeline_dir"] = output_dir / "pipeline"
    return result

