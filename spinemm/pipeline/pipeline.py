"""SpinePipeline: detect -> locate -> grade, run study batch by study batch over one series store.

Each batch of studies goes through every stage before the next batch is read, so the
:class:`~spinemm.data.store.SeriesStore` holds a batch's series while all stages read them and each
DICOM file is opened once per run. :class:`PipelineResult` keeps every stage's output, so "the
first stage alone" is read from the result, never recomputed with a stage taken out.

A pipeline folder describes itself::

    pipeline.json        spinemm version, the stages in order, each stage's config
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

from ..constants import LABEL_COLUMNS
from ..data.store import SeriesStore
from ..data.validate import read_csv
from ..errors import SpineDataError, SpineModelError
from ..models.config import GraderConfig, LocatorConfig, check_config
from ..models.hub_mixin import SpineHubMixin
from ..models.names import PIPELINE_CONFIG, parse_model_name
from ..models.saved import check_finite
from ..models.towers import TextTower
from .detect import DetectStage
from .findings import Findings
from .grade import GradeStage
from .locate import LocateStage
from .parallel import run_distributed, run_in_workers
from .result import PipelineResult

__all__ = ["SpinePipeline", "PipelineResult", "load_pipeline", "PIPELINE_CONFIG"]

STAGE_ORDER = ("detect", "locate", "grade")


class SpinePipeline(SpineHubMixin):
    """The stages in order: ``detect`` (required), then ``locate`` and ``grade`` when present.
    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` as :mod:`spinemm.models.hub_mixin`."""

    def __init__(self, detect: DetectStage | torch.nn.Module, locate: LocateStage | None = None,
                 grade: GradeStage | None = None) -> None:
        self.detect = detect if isinstance(detect, DetectStage) else DetectStage(detect)
        self.locate, self.grade = locate, grade
        self._hub_mixin_config = None  # pipeline.json describes the folder; no mixin config.json beside it

    @property
    def stages(self) -> list[str]:
        return [name for name in STAGE_ORDER if getattr(self, name) is not None]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SpinePipeline:
        """Every stage's model moved to ``device`` and/or cast to ``dtype`` (in place; returns self)."""
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.detect.model.to(**kwargs)
        for stage in (self.locate, self.grade):
            if stage is not None:
                stage.to(**kwargs)
        return self

    def eval(self) -> SpinePipeline:
        """Every stage's model in eval mode (loading does this; :meth:`run` reads in eval mode anyway)."""
        self.detect.model.eval()
        for stage in (self.locate, self.grade):
            if stage is not None:
                stage.eval()
        return self

    def __repr__(self) -> str:
        return f"SpinePipeline(stages={self.stages})"

    def compile(self, **options: Any) -> SpinePipeline:
        """Run every stage's model under ``torch.compile(fullgraph=True, **options)`` for
        inference: the first stage's fusion core, the locator, the grader (text tower and input
        checks stay eager). The first batches compile (tens of seconds on a CPU); the weights and
        the saved folder are unchanged. Returns the pipeline."""
        self.detect.compile(**options)
        for stage in (self.locate, self.grade):
            if stage is not None:
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
        from ..data.dataset import SpineDataset, collate

        root = Path(root)
        own_store = store is None  # ours: each batch's series are dropped once every stage has read them
        store = store if store is not None else SeriesStore(root, split, cache_dir=cache_dir)
        dataset = SpineDataset(root, split, study_ids=study_ids, augment=False, store=store, on_bad_series="warn",
                               **self.detect.preprocess)
        if distributed is None:  # launched by `accelerate launch` (or torchrun) with several processes
            distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if workers > 0 or distributed:  # each process moves (and compiles) its own copy of the models
            kwargs = {"store": store, "batch_size": batch_size, "device": device, "compile": compile,
                      "progress": progress}
            result = run_distributed(self, root, split, dataset.study_ids, **kwargs) if distributed else \
                run_in_workers(self, root, split, dataset.study_ids, workers, **kwargs)
            result.order = _sample_submission_order(root, split) if study_ids is None else None
            return result
        if device is not None:
            self.to(device)
        if compile:
            self.compile()
        device = next(self.detect.model.parameters()).device
        parts: dict[str, list] = {"ids": [], "probs": [], "detected": [], "located": [], "grades": [], "graded": []}
        starts = range(0, len(dataset), batch_size)
        with self._remembering_texts():  # every batch asks for the same query texts
            for start in tqdm(starts, desc="predict", unit="batch", disable=not progress):
                batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                probs, found = self.detect(batch, device)
                parts["ids"] += [int(m["study_id"]) for m in batch["meta"]]
                parts["probs"].append(probs)
                parts["detected"].append(found)
                if self.locate is not None:
                    found = self.locate.run(found, store)
                    parts["located"].append(found)
                if self.grade is not None:
                    grades = self.grade.run(found, store)
                    parts["grades"].append(grades)
                    parts["graded"].append(grades.findings)
                if own_store:  # no stage comes back to a study: peak memory stays one batch's series
                    for meta in batch["meta"]:
                        store.forget_study(int(meta["study_id"]))
        result = PipelineResult(parts["ids"], np.concatenate(parts["probs"]) if parts["probs"] else
                                np.zeros((0, len(LABEL_COLUMNS), 3)), Findings.concat(parts["detected"]))
        if self.locate is not None:
            result.located = Findings.concat(parts["located"])
        if self.grade is not None:
            result.grade_log_probs = np.concatenate([g.log_probs for g in parts["grades"]]) if parts["grades"] \
                else np.zeros((0, 3))
            result.grade_probs = np.concatenate([self.grade.with_context(g) for g in parts["grades"]]) \
                if parts["grades"] else np.zeros((0, 3))
            result.graded = Findings.concat(parts["graded"])
        result.order = _sample_submission_order(root, split) if study_ids is None else None
        return result

    def _remembering_texts(self) -> contextlib.ExitStack:
        """A block in which every stage's text tower encodes each distinct text once
        (:meth:`~spinemm.models.towers.TextTower.remembering`)."""
        stack = contextlib.ExitStack()
        encoder = self.grade.encoder if self.grade is not None else None
        for model in (self.detect.model, encoder):
            tower = getattr(model, "text", None)
            if isinstance(tower, TextTower):
                stack.enter_context(tower.remembering())
        return stack

    # ---------------------------------------------------------------------------- save / load
    def _save_pretrained(self, save_directory: Path) -> None:
        """Write the pipeline folder (module docstring); ``save_pretrained`` adds the model card."""
        from safetensors.torch import save_model

        from .. import __version__

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.detect.model.save_pretrained(out / "detect")
        meta: dict[str, Any] = {"spinemm_version": __version__, "stages": self.stages}
        if self.locate is not None:
            meta["locate"] = self.locate.config_dict()
            save_model(self.locate, str(out / "locate.safetensors"))
        if self.grade is not None:
            meta["grade"] = self.grade.config_dict()
            self.grade.save_to(out)
        (out / PIPELINE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def _load_folder(cls, folder: Path) -> SpinePipeline:
        return load_pipeline(folder)

    def card_facts(self) -> dict[str, Any]:
        return {
            "title": f"spinemm pipeline ({self.detect.model.config.name})",
            "summary": "A staged spinemm pipeline for the RSNA 2024 lumbar spine task: detect (a SpineCLIP model "
                       "grades and places the 25 findings of a study), then the stages listed below. "
                       "spinemm.predict writes a Kaggle submission and the finding locations.",
            "preset": self.detect.model.config.name,
            "stages": " -> ".join(self.stages),
            "towers": self.detect.model.tower_sources() if hasattr(self.detect.model, "tower_sources") else "",
            "loader": 'pipeline = spinemm.load_pipeline("hf-hub:ORG/NAME")   # or a local folder\n'
                      'submission, locations = spinemm.predict(pipeline, "/path/to/rsna", split="test")',
        }


def load_pipeline(source: str | os.PathLike) -> SpinePipeline:
    """A pipeline by model name (:mod:`spinemm.models.names`): a pipeline folder
    (:meth:`SpinePipeline.save_pretrained`) or ``hf-hub:`` repo holding one; else whatever
    ``spinemm.load_model`` reads (a saved model, a preset), as a pipeline of the detect stage alone."""
    from safetensors.torch import load_model as load_weights

    from ..models.factory import load_model

    name = parse_model_name(source, setting="load_pipeline(source)")
    folder = None if name.is_config else name.saved_folder("load_pipeline(source)")
    if folder is None or not (folder / PIPELINE_CONFIG).is_file():
        return SpinePipeline(load_model(folder if folder is not None else name.target))
    meta = _read_pipeline_json(folder / PIPELINE_CONFIG)
    stages = meta.get("stages", ["detect"])
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        raise SpineModelError(f"{folder / PIPELINE_CONFIG}: stages must be a list of stage names, got {stages!r}")
    unknown = sorted(set(stages) - set(STAGE_ORDER))
    if unknown or "detect" not in stages:
        raise SpineModelError(f"{folder / PIPELINE_CONFIG}: stages {stages} must include detect and be among {STAGE_ORDER}")
    pipeline = SpinePipeline(load_model(folder / "detect"))
    if "locate" in stages:
        weights = folder / "locate.safetensors"
        if not weights.is_file():
            raise SpineModelError(f"{weights} is missing: the pipeline folder lists stage 'locate'")
        pipeline.locate = LocateStage(_config(LocatorConfig, _section(meta, "locate", folder), folder, "locate"))
        try:
            load_weights(pipeline.locate, str(weights))
        except Exception as err:  # safetensors' own error types: not a safetensors file, wrong keys
            raise SpineModelError(f"cannot load {weights}: {type(err).__name__}: {err}") from None
        check_finite(pipeline.locate, weights)
    if "grade" in stages:
        values = _section(meta, "grade", folder)
        query_dim = values.pop("query_dim", 256)
        if isinstance(query_dim, bool) or not isinstance(query_dim, int) or not 1 <= query_dim <= 8192:
            raise SpineModelError(f"{folder / PIPELINE_CONFIG}: grade.query_dim must be an integer in 1..8192, "
                                  f"got {query_dim!r}")
        config = _config(GraderConfig, values, folder, "grade")
        try:
            pipeline.grade = GradeStage.load_from(folder, config, query_dim)
        except SpineModelError as err:  # e.g. a backbone no registry knows: say which file asked for it
            raise SpineModelError(err if str(folder) in str(err) else f"{folder / PIPELINE_CONFIG}: grade: {err}") \
                from None
        check_finite(pipeline.grade, folder / "grade.safetensors")
    return pipeline.eval()


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


def _config(cls: type, values: dict[str, Any], folder: Path, name: str) -> Any:
    """The stage config of section ``name``, every key typed and bounded (``check_config``)."""
    where = f"{folder / PIPELINE_CONFIG}: {name}."
    try:
        config = cls(**values)
    except (TypeError, ValueError) as err:
        raise SpineModelError(f"{where[:-1]}: bad {cls.__name__}: {err}") from None
    check_config(config, where)
    return config


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
