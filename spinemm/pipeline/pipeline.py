"""SpinePipeline: an ordered list of stages (detect -> locate -> grade), run study batch by study
batch over one series store.

Each batch of studies goes through every stage before the next batch is read, so the
:class:`~spinemm.data.store.SeriesStore` holds a batch's series while all stages read them and each
DICOM file is opened once per run. Every stage implements :class:`~spinemm.pipeline.stage.Stage`;
the pipeline only loops over them. :class:`PipelineResult` keeps every stage's output by its name,
so "the first stage alone" is read from the result, never recomputed with a stage taken out.

A pipeline folder describes itself::

    pipeline.json        spinemm version, the stages in order, each stage's config section
    detect/              the first stage's SpineCLIP (save_pretrained: config.json, model.safetensors, tokenizer)
    locate.safetensors   the level locator's weights      (when the pipeline has the stage)
    grade.safetensors    the grader's weights and study context (the clip grader's
    grade/               encoder, a SpineCLIP folder as detect/, is beside it)
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.store import SeriesStore
from ..data.tables import load_tables
from ..data.validate import read_csv
from ..errors import SpineDataError, SpineModelError
from ..models.factory import load_model
from ..models.hub_mixin import SpineHubMixin
from ..models.names import PIPELINE_CONFIG, parse_model_name
from ..models.towers import TextTower
from .findings import slice_points
from .parallel import run_distributed, run_in_workers
from .registry import registered_stages, stage_class, stage_rank
from .result import PipelineResult
from .stage import RunJob, Stage, StageInput, StageOutput, merge_probs

__all__ = ["SpinePipeline", "PipelineResult", "load_pipeline", "PIPELINE_CONFIG"]


class SpinePipeline(SpineHubMixin):
    """Stages in their registered order (:mod:`spinemm.pipeline.registry`): the first is required
    (a bare model is taken as the first stage's, ``detect``), the rest optional::

        SpinePipeline(detect_model, LocateStage(...), GradeStage(...))
        SpinePipeline(detect_model, grade=GradeStage(...))

    Each stage is also an attribute by its name (``pipeline.grade``; None for a registered stage the
    pipeline lacks). ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` as
    :mod:`spinemm.models.hub_mixin`."""

    def __init__(self, *stages: Stage | torch.nn.Module | None, **named: Stage | None) -> None:
        self._hub_mixin_config = None  # pipeline.json describes the folder; no mixin config.json beside it
        self._stages: dict[str, Stage] = {}
        given = [s for s in stages if s is not None]
        if given and not isinstance(given[0], Stage):  # a bare model: the first registered stage wraps it
            given[0] = stage_class(registered_stages()[0])(given[0])
        for key, stage in named.items():
            if stage is not None and getattr(stage, "name", None) != key:
                raise SpineModelError(f"SpinePipeline({key}=...) needs a stage named {key!r}, got {stage!r}")
        for stage in given + [s for s in named.values() if s is not None]:
            self.set_stage(stage)
        if not self._stages or next(iter(self._stages)) != registered_stages()[0]:
            raise SpineModelError(f"a pipeline starts with stage {registered_stages()[0]!r}, got {self.stage_names}")

    def set_stage(self, stage: Stage) -> SpinePipeline:
        """Add ``stage`` (or replace the stage of its name), in its registered place; returns self."""
        if not isinstance(stage, Stage):
            raise SpineModelError(f"a pipeline stage must be a spinemm.pipeline.Stage, got {type(stage).__name__}")
        self._stages[stage_class(stage.name).name] = stage
        self._stages = dict(sorted(self._stages.items(), key=lambda item: stage_rank(item[0])))
        return self

    def before(self, name: str) -> SpinePipeline:
        """A pipeline of this one's stages that run before stage ``name`` (the same stage objects)."""
        rank = stage_rank(name)
        return SpinePipeline(*(s for n, s in self._stages.items() if stage_rank(n) < rank))

    @property
    def stages(self) -> list[Stage]:
        """The stages, in the order they run."""
        return list(self._stages.values())

    @property
    def stage_names(self) -> list[str]:
        return list(self._stages)

    def __getattr__(self, name: str) -> Any:
        # stages by name (pipeline.grade); None for a registered stage this pipeline does not have
        stages = self.__dict__.get("_stages")
        if stages is not None and (name in stages or name in registered_stages()):
            return stages.get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SpinePipeline:
        """Every stage moved to ``device`` and/or cast to ``dtype`` (in place; returns self)."""
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for stage in self.stages:
            stage.to(**kwargs)
        return self

    def eval(self) -> SpinePipeline:
        """Every stage in eval mode (loading does this; :meth:`run` reads in eval mode anyway)."""
        for stage in self.stages:
            stage.eval()
        return self

    def __repr__(self) -> str:
        return f"SpinePipeline(stages={self.stage_names})"

    def compile(self, **options: Any) -> SpinePipeline:
        """Run every stage's models under ``torch.compile(fullgraph=True, **options)`` for
        inference (:meth:`Stage.compile_models`: the first stage's fusion core, the locator, the
        grader; text towers and input checks stay eager). The first batches compile (tens of
        seconds on a CPU); the weights and the saved folder are unchanged. Returns the pipeline."""
        for stage in self.stages:
            stage.compile_models(**options)
        return self

    def run(self, root: str | Path, split: str = "test", *, study_ids: list[int] | None = None,
            store: SeriesStore | None = None, cache_dir: str | Path | None = None, batch_size: int = 2,
            device: torch.device | str | None = None, workers: int = 0, distributed: bool | None = None,
            compile: bool = False, progress: bool = True) -> PipelineResult:
        """Run every stage over the studies of ``root``'s ``split`` (or ``study_ids``), a batch of
        studies at a time. ``workers > 0``: that many processes (forked: keep the models on the
        CPU and name the ``device``) each run a contiguous share of the studies
        (:func:`~spinemm.pipeline.parallel.run_in_workers`). ``distributed`` (default:
        when launched with several processes, ``WORLD_SIZE > 1``): each process of an ``accelerate
        launch`` runs its share and every process gets all rows
        (:func:`~spinemm.pipeline.parallel.run_distributed`). Unreadable series are warned about
        by name; nothing is dropped. ``compile``: :meth:`compile` first. A store made here drops each
        batch's series once every stage has read them (memory: one batch, whatever the study count);
        pass a ``store`` to keep them for later reads (up to its ``memory_bytes``)."""
        root = Path(root)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        own_store = store is None  # ours: each batch's series are dropped once every stage has read them
        store = store if store is not None else SeriesStore(root, split, cache_dir=cache_dir)
        frame = load_tables(root, split)
        ids = [int(s) for s in dict.fromkeys(frame["study_id"])] if study_ids is None else [int(s) for s in study_ids]
        if distributed is None:  # launched by `accelerate launch` (or torchrun) with several processes
            distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if workers > 0 or distributed:  # each process moves (and compiles) its own copy of the models
            kwargs = {"store": store, "batch_size": batch_size, "device": device, "compile": compile,
                      "progress": progress}
            result = run_distributed(self, root, split, ids, **kwargs) if distributed else \
                run_in_workers(self, root, split, ids, workers, **kwargs)
            result.order = _sample_submission_order(root, split) if study_ids is None else None
            return result
        if device is not None:
            self.to(device)
        if compile:
            self.compile()
        job = RunJob(root, split, ids, store, frame)
        for stage in self.stages:
            stage.begin(job)
        outputs: dict[str, list[StageOutput]] = {name: [] for name in self._stages}
        points = []  # the final points in their own slices' pixels, read while the series are held
        try:
            with self._remembering_texts():  # every batch asks for the same query texts
                for start in tqdm(range(0, len(ids), batch_size), desc="predict", unit="batch", disable=not progress):
                    inputs = StageInput(ids[start:start + batch_size], store)
                    for name, stage in self._stages.items():
                        out = stage.run(inputs)
                        outputs[name].append(out)
                        inputs = StageInput(inputs.study_ids, store, out.findings, merge_probs(inputs.probs, out.probs))
                    points.append(slice_points(inputs.findings, store))
                    if own_store:  # no stage comes back to a study: peak memory stays one batch's series
                        for study_id in inputs.study_ids:
                            store.forget_study(study_id)
        finally:
            for stage in self.stages:
                stage.end()
        result = PipelineResult(ids, {name: StageOutput.concat(parts) for name, parts in outputs.items()},
                                slice_xy=np.concatenate(points) if points else None)
        result.order = _sample_submission_order(root, split) if study_ids is None else None
        return result

    def _remembering_texts(self) -> contextlib.ExitStack:
        """A block in which every stage's text tower encodes each distinct text once
        (:meth:`~spinemm.models.towers.TextTower.remembering`)."""
        stack = contextlib.ExitStack()
        for stage in self.stages:
            for tower in stage.text_towers():
                if isinstance(tower, TextTower):
                    stack.enter_context(tower.remembering())
        return stack

    # ---------------------------------------------------------------------------- save / load
    def _save_pretrained(self, save_directory: Path) -> None:
        """Write the pipeline folder (module docstring); ``save_pretrained`` adds the model card."""
        from .. import __version__

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {"spinemm_version": __version__, "stages": self.stage_names}
        for name, stage in self._stages.items():
            section = stage.save(out)
            if section:
                meta[name] = section
        (out / PIPELINE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def _load_folder(cls, folder: Path) -> SpinePipeline:
        return load_pipeline(folder)

    def card_facts(self) -> dict[str, Any]:
        first = self.stages[0]
        model = getattr(first, "model", first)
        preset = getattr(getattr(model, "config", None), "name", type(model).__name__)
        return {
            "title": f"spinemm pipeline ({preset})",
            "summary": "A staged spinemm pipeline for the RSNA 2024 lumbar spine task: detect (a SpineCLIP model "
                       "grades and places the 25 findings of a study), then the stages listed below. "
                       "spinemm.predict writes a Kaggle submission and the finding locations.",
            "preset": preset,
            "stages": " -> ".join(self.stage_names),
            "towers": model.tower_sources() if hasattr(model, "tower_sources") else "",
            "loader": 'pipeline = spinemm.load_pipeline("hf-hub:ORG/NAME")   # or a local folder\n'
                      'submission, locations = spinemm.predict(pipeline, "/path/to/rsna", split="test")',
        }


def load_pipeline(source: str | os.PathLike) -> SpinePipeline:
    """A pipeline by model name (:mod:`spinemm.models.names`): a pipeline folder
    (:meth:`SpinePipeline.save_pretrained`) or ``hf-hub:`` repo holding one; else whatever
    ``spinemm.load_model`` reads (a saved model, a preset), as a pipeline of the first stage alone."""
    name = parse_model_name(source, setting="load_pipeline(source)")
    folder = None if name.is_config else name.saved_folder("load_pipeline(source)")
    if folder is None or not (folder / PIPELINE_CONFIG).is_file():
        return SpinePipeline(load_model(folder if folder is not None else name.target))
    meta = _read_pipeline_json(folder / PIPELINE_CONFIG)
    stages = meta.get("stages", registered_stages()[:1])
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        raise SpineModelError(f"{folder / PIPELINE_CONFIG}: stages must be a list of stage names, got {stages!r}")
    unknown = sorted(set(stages) - set(registered_stages()))
    if unknown or registered_stages()[0] not in stages:
        raise SpineModelError(f"{folder / PIPELINE_CONFIG}: stages {stages} must include {registered_stages()[0]} "
                              f"and be among the registered stages {registered_stages()}")
    return SpinePipeline(*(stage_class(name).load(folder, _section(meta, name, folder)) for name in stages)).eval()


def _read_pipeline_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpineModelError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise SpineModelError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    return meta


def _section(meta: dict[str, Any], name: str, folder: Path) -> dict[str, Any]:
    """A copy of ``pipeline.json``'s section ``name`` (empty when absent), refused unless a mapping."""
    values = meta.get(name) or {}
    if not isinstance(values, dict):
        raise SpineModelError(f"{folder / PIPELINE_CONFIG}: {name} must be a mapping, got {type(values).__name__}")
    return dict(values)


def _sample_submission_order(root: Path, split: str) -> list[str] | None:
    """sample_submission.csv's row_ids, the order of the submission's rows (checked: a missing
    column, an empty file or a repeated row_id is a SpineDataError naming the file)."""
    path = root / "sample_submission.csv"
    if split != "test" or not path.exists():
        return None
    rows = read_csv(path, ["row_id"])["row_id"]
    if rows.empty:
        raise SpineDataError(f"{path}: no rows (expected one row_id per study, condition and level)")
    repeated = rows[rows.duplicated()]
    if len(repeated):
        raise SpineDataError(f"{path}: line {repeated.index[0] + 2} repeats row_id {repeated.iloc[0]!r}; "
                             f"each row_id must appear once")
    return rows.tolist()
