"""A pipeline run spread over processes, each taking a contiguous share of the studies.

- :func:`run_in_workers`: ``predict(..., workers=N)`` on one machine. The workers are forked from
  the calling process, so they start at once with the models already in memory (nothing is
  pickled but the results), and each runs single-threaded: N workers use N cores, and every study's
  DICOM files are decoded by the worker that grades it. With ``device="cuda"`` each worker moves
  its own copy of the models to the GPU (the calling process must not have touched CUDA), so N
  processes decode on N cores and share the GPU. Sharding whole studies, rather than
  decoding in workers and grading in one process, keeps the series where they are read: a
  512 px study's volumes never cross a process boundary.
- :func:`run_distributed`: under ``accelerate launch``, each process runs its contiguous share
  (:func:`shares`, the split ``PartialState.split_between_processes`` makes) and the results are
  gathered once (``accelerate.utils.gather_object``), in study order, on every process.

Either way the rows are the same as one process's, in the same order.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import SpineModelError
from .result import PipelineResult

if TYPE_CHECKING:  # the pipeline imports this module to run in parallel: name its type, never import it
    SpinePipeline = Any

__all__ = ["run_in_workers", "run_distributed", "shares"]

_PIPELINE: SpinePipeline | None = None  # the forked workers' pipeline: inherited, never pickled
SHARES_PER_WORKER = 4


def shares(study_ids: Sequence[int], parts: int) -> list[list[int]]:
    """``study_ids`` cut into ``parts`` contiguous, nearly equal shares (empty ones dropped)."""
    return [[int(s) for s in share] for share in np.array_split(np.asarray(study_ids, dtype=np.int64), parts)
            if len(share)]


def run_in_workers(pipeline: SpinePipeline, root: str | Path, split: str, study_ids: Sequence[int], workers: int,
                   **run_kwargs: Any) -> PipelineResult:
    """Run ``pipeline`` over ``study_ids`` in ``workers`` forked CPU processes; results in study order."""
    if torch.cuda.is_initialized() or any(p.device.type != "cpu" for stage in pipeline.stages
                                                 for p in stage.parameters()):
        # a forked child cannot use the CUDA context of its parent
        raise SpineModelError("predict(workers=N) forks its workers after CUDA was initialised here: keep the "
                              "pipeline on the CPU and pass device='cuda' (each worker moves its own copy), or "
                              "launch one process per GPU with `accelerate launch`")
    if "fork" not in multiprocessing.get_all_start_methods():
        raise SpineModelError("predict(workers=N) needs the 'fork' start method (Linux, macOS); use workers=0")
    global _PIPELINE
    _PIPELINE = pipeline
    # a few shares per worker, handed out as workers free up: a slow share does not hold the rest back
    jobs = [(str(root), split, share, run_kwargs) for share in shares(study_ids, workers * SHARES_PER_WORKER)]
    try:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("fork"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            parts = list(pool.map(_run_share, jobs))
    finally:
        _PIPELINE = None
    return PipelineResult.concat(parts)


def _run_share(job: tuple[str, str, list[int], dict[str, Any]]) -> PipelineResult:
    root, split, share, run_kwargs = job
    return _PIPELINE.run(root, split, study_ids=share, **{**run_kwargs, "progress": False, "distributed": False})


def run_distributed(pipeline: SpinePipeline, root: str | Path, split: str, study_ids: Sequence[int],
                    **run_kwargs: Any) -> PipelineResult:
    """Under ``accelerate launch``: this process's share of ``study_ids``, then every share gathered
    (on every process) in study order."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    device = run_kwargs.get("device")
    # no GPU (or a CPU run asked for): one gloo group over the CPU processes, as the engine's cpu=True
    cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
    state = PartialState(cpu=cpu)
    share = shares(study_ids, state.num_processes)
    mine = share[state.process_index] if state.process_index < len(share) else []
    run_kwargs = {**run_kwargs, "distributed": False, "device": device if device is not None else state.device,
                  "progress": run_kwargs.get("progress", True) and state.is_main_process}
    part = pipeline.run(root, split, study_ids=mine, **run_kwargs) if mine else None
    parts = gather_object([part]) if state.num_processes > 1 else [part]
    return PipelineResult.concat([p for p in parts if p is not None])
