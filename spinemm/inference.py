"""Kaggle-format predictions with locations for every study of an RSNA-layout folder.

:func:`predict` runs a :class:`~spinemm.pipeline.SpinePipeline` (or a single SpineCLIP model, as
a pipeline of its detect stage alone) and returns a :class:`~spinemm.pipeline.PipelineResult`
holding every stage's output; it unpacks as ``submission, locations``.

Nothing is dropped: a study whose series is missing or unreadable still gets all 25 rows (the model
sees that plane as missing, with a warning naming the series), and its location rows say NaN.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .data.store import SeriesStore
from .pipeline.detect import preprocess_settings
from .pipeline.findings import LOCATION_COLUMNS
from .pipeline.pipeline import SpinePipeline, load_pipeline
from .pipeline.result import PipelineResult, submission_from_probs

__all__ = ["predict", "preprocess_settings", "submission_from_probs", "LOCATION_COLUMNS", "PipelineResult"]


def predict(model: SpinePipeline | torch.nn.Module | str | os.PathLike, root: str | Path, split: str = "test", *,
            batch_size: int = 2, device: torch.device | str | None = None, cache_dir: str | Path | None = None,
            store: SeriesStore | None = None, study_ids: list[int] | None = None, workers: int = 0,
            distributed: bool | None = None, compile: bool = False, progress: bool = True) -> PipelineResult:
    """Predict severity and location for every study of ``root``'s ``split``.

    ``model``: a pipeline, a SpineCLIP model, or a folder / preset name (:func:`~spinemm.pipeline.load_pipeline`).
    The result's :meth:`~spinemm.pipeline.PipelineResult.submission` has every study x 25 rows, in
    ``sample_submission.csv`` order when that file exists (else study order x ``LABEL_COLUMNS``),
    rows summing to 1; :meth:`~spinemm.pipeline.PipelineResult.locations` has one row per (study,
    condition, level) with the series, instance_number and x, y in the original pixels, plus the
    confidence. ``study_ids`` restricts the run to those studies (then rows follow study order).
    ``store`` (or ``cache_dir``): where series are read from; each DICOM file is opened once.
    ``workers``: CPU processes that each read and predict a share of the studies (0: this process
    alone). Under ``accelerate launch`` with several processes, each process predicts its share and
    all of them return every row (``distributed``, see :meth:`~spinemm.pipeline.SpinePipeline.run`).
    ``compile``: every stage's model under ``torch.compile`` (:meth:`~spinemm.pipeline.SpinePipeline.compile`).
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_pipeline(model)
    pipeline = model if isinstance(model, SpinePipeline) else SpinePipeline(model)
    return pipeline.run(root, split, study_ids=study_ids, store=store, cache_dir=cache_dir, batch_size=batch_size,
                        device=device, workers=workers, distributed=distributed, compile=compile,
                        progress=progress)
