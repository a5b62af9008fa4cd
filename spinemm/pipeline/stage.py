"""The one interface every pipeline stage implements, and the registry that orders them.

A stage is a ``torch.nn.Module`` (so ``to``, ``eval``, ``parameters`` and ``state_dict`` come
with it) that, for one batch of studies, reads :class:`StageInput` (the studies, the run's
:class:`~spinemm.data.store.SeriesStore`, and the previous stage's points and probabilities) and
returns a :class:`StageOutput`. It saves itself into a pipeline folder and returns the section
``pipeline.json`` keeps for it; :meth:`Stage.load` reads both back. :class:`SpinePipeline` only
loops over its stages, so a new stage is one class and one
:func:`~spinemm.pipeline.registry.register_stage` line (training it is one
:func:`~spinemm.training.stages.register_trainer` line).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_model, save_model

from ..data.store import SeriesStore
from ..errors import SpineModelError
from ..models.config import config_from_dict
from ..models.names import PIPELINE_CONFIG
from ..models.saved import check_finite
from .findings import Findings

__all__ = ["Stage", "StageInput", "StageOutput", "RunJob", "stage_config", "merge_probs"]


@dataclass
class RunJob:
    """What one :meth:`SpinePipeline.run` reads: given to every stage once, before the first batch."""

    root: Path
    split: str
    study_ids: list[int]
    store: SeriesStore
    frame: pd.DataFrame  # the split's tables (``spinemm.data.load_tables``), read once per run


@dataclass
class StageInput:
    """One batch of studies as the next stage sees it."""

    study_ids: list[int]
    store: SeriesStore
    findings: Findings | None = None  # the previous stage's points (None for the first stage)
    probs: np.ndarray | None = None  # [len(study_ids) * 25, 3], the probabilities so far (None for the first)


def merge_probs(before: np.ndarray | None, probs: np.ndarray | None) -> np.ndarray | None:
    """The running probabilities after a stage: its rows where it gave them (not NaN), else before."""
    if probs is None or before is None:
        return before if probs is None else probs
    return np.where(np.isnan(probs), before, probs)


@dataclass
class StageOutput:
    """What a stage returns for a batch: its points, and its probabilities where it graded.

    ``probs`` rows left NaN keep the earlier stages' probabilities; ``extras`` holds any other
    per-finding arrays (``[rows, ...]``) the stage wants kept in the result, by name."""

    findings: Findings
    probs: np.ndarray | None = None  # [rows, 3]
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def concat(cls, parts: list[StageOutput]) -> StageOutput:
        """The outputs of consecutive batches as one."""
        if not parts:
            return cls(Findings.concat([]))
        probs = [p.probs for p in parts]
        keys = parts[0].extras.keys()
        return cls(Findings.concat([p.findings for p in parts]),
                   None if any(p is None for p in probs) else np.concatenate(probs),
                   {k: np.concatenate([p.extras[k] for p in parts]) for k in keys})


class Stage(torch.nn.Module):
    """A pipeline stage. Subclasses set :attr:`name` (the key in ``pipeline.json`` and in the
    result), implement :meth:`run`, and either keep the default save/load (weights in
    ``<name>.safetensors``, a :attr:`config_class` dataclass in ``pipeline.json``) or override them."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type | None] = None  # the dataclass this stage is built from, if any

    def __init__(self, config: Any = None) -> None:
        super().__init__()
        if self.config_class is not None:
            self.config = config if config is not None else self.config_class()

    # ------------------------------------------------------------------------------- running
    def begin(self, job: RunJob) -> None:
        """Called once per run before the first batch (e.g. to index the run's studies)."""

    def end(self) -> None:
        """Called once per run after the last batch (e.g. to let go of what :meth:`begin` held)."""

    def run(self, inputs: StageInput) -> StageOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement run(inputs) -> StageOutput")

    def compile_models(self, **options: Any) -> None:
        """Put this stage's models under ``torch.compile`` for inference (default: nothing to do)."""

    def text_towers(self) -> list[torch.nn.Module]:
        """Text towers this stage encodes fixed query texts with (the pipeline caches their outputs)."""
        return []

    # ---------------------------------------------------------------------------- save / load
    def config_dict(self) -> dict[str, Any]:
        """This stage's section of ``pipeline.json``."""
        return dataclasses.asdict(self.config) if self.config_class is not None else {}

    def save(self, folder: Path) -> dict[str, Any]:
        """Write this stage's files into the pipeline ``folder``; returns its ``pipeline.json`` section."""
        save_model(self, str(Path(folder) / f"{self.name}.safetensors"))
        return self.config_dict()

    @classmethod
    def load(cls, folder: Path, section: dict[str, Any]) -> Stage:
        """The stage :meth:`save` wrote in ``folder``, from its ``pipeline.json`` ``section``."""
        config = stage_config(cls.config_class, section, folder, cls.name) if cls.config_class is not None else None
        try:
            stage = cls(config) if config is not None else cls()
        except (SpineModelError, ValueError) as err:  # the model's own checks of its config: name the file
            raise SpineModelError(f"{Path(folder) / PIPELINE_CONFIG}: {cls.name}: {err}") from None
        weights = Path(folder) / f"{cls.name}.safetensors"
        if not weights.is_file():
            raise SpineModelError(f"{weights} is missing: the pipeline folder lists stage {cls.name!r}")
        try:
            load_model(stage, str(weights))
        except Exception as err:  # safetensors' own error types: not a safetensors file, wrong keys
            raise SpineModelError(f"cannot load {weights}: {type(err).__name__}: {err}") from None
        check_finite(stage, weights)
        return stage


def stage_config(cls: type, values: dict[str, Any], folder: Path, name: str) -> Any:
    """The config dataclass ``cls`` of ``pipeline.json``'s section ``name``, every key known (else
    the nearest is named), typed and bounded; errors are SpineModelErrors naming file and key."""
    return config_from_dict(cls, values, f"{Path(folder) / PIPELINE_CONFIG}: {name}.")
