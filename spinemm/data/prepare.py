"""Fill the series cache for a whole RSNA-layout folder with all cores: ``spinemm cache ROOT``.

Every series listed in ``{split}_series_descriptions.csv`` is decoded once, windowed and written to
the cache folder as :class:`~spinemm.data.store.SeriesStore` writes it at run time (full
resolution, float16, with its geometry), so later training and predict runs over that folder open
no DICOM file. Work is spread over ``workers`` processes, one series at a time each, so peak memory
is a few series per worker whatever the size of the folder.

Resumable: an entry is published atomically when complete, and a series whose entry exists (found
through the cache's stat index, without reading its DICOM bytes) is skipped, so a killed run
started again does only what was left. A series that cannot be read is reported by name, never
dropped silently, and the rest go on.

Past one machine: under ``accelerate launch`` (``WORLD_SIZE > 1``) each process takes a contiguous
share of the series (``PartialState.split_between_processes``) with its node's share of the cores,
and the reports are gathered, so every process returns the whole run's report.

Why not ``datasets.Dataset.map(num_proc=N)`` into Arrow shards: the runs read series by content
key, one at a time and in any order, with their geometry; Arrow shards would be a second copy
of the same data in a layout nothing reads back.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import SpineDataError
from .store import SeriesStore
from .tables import load_series_descriptions, series_path

__all__ = ["fill_cache", "CacheReport"]


@dataclass
class CacheReport:
    """What :func:`fill_cache` did."""

    series: int = 0  # series listed
    written: int = 0  # decoded and written now
    skipped: int = 0  # already in the cache
    files: int = 0  # DICOM files decoded now
    failed: dict[str, str] = field(default_factory=dict)  # series folder -> error
    seconds: float = 0.0

    @classmethod
    def merge(cls, parts: list[CacheReport]) -> CacheReport:
        """The report of one run made of ``parts`` that ran side by side (its time: the slowest part's)."""
        return cls(series=sum(p.series for p in parts), written=sum(p.written for p in parts),
                   skipped=sum(p.skipped for p in parts), files=sum(p.files for p in parts),
                   failed={k: v for p in parts for k, v in p.failed.items()},
                   seconds=max((p.seconds for p in parts), default=0.0))

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (f"{self.series} series: {self.written} written ({self.files} files, {self.files_per_s:.0f} files/s), "
                f"{self.skipped} already cached, {len(self.failed)} failed, {self.seconds:.1f} s")


def fill_cache(root: str | os.PathLike, cache_dir: str | os.PathLike, split: str = "train", *,
               workers: int | None = None, progress: bool = True, distributed: bool | None = None) -> CacheReport:
    """Decode every series of ``root``'s ``split`` into ``cache_dir`` (module docstring).

    ``workers``: processes (default: every core this process may use, shared with the other
    processes of an ``accelerate launch`` on the same node; 0 decodes in this process).
    ``distributed`` (default: when launched with several processes): this process caches its share
    and returns the report of all. Failed series are listed in the report (and warned about by
    name, by the process that met them), the others still cached.
    """
    root, cache_dir = Path(root), Path(cache_dir)
    pairs = load_series_descriptions(root, split)[["study_id", "series_id"]].drop_duplicates()
    jobs = [(str(root), split, str(cache_dir), int(st), int(se)) for st, se in pairs.itertuples(index=False)]
    if distributed is None:
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = None
    if distributed:
        from accelerate import PartialState

        state = PartialState(cpu=True)  # decoding is CPU work: one gloo group, whatever devices the node has
        with state.split_between_processes(jobs) as mine:
            jobs = list(mine)
        progress = progress and state.is_main_process
    if workers is None:  # the node's cores, split between the launched processes that share them
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed else 1
        workers = max(1, len(os.sched_getaffinity(0)) // local)
    report = CacheReport(series=len(jobs))
    tic = time.perf_counter()
    with tqdm(total=len(jobs), desc="cache", unit="series", disable=not progress) as bar:
        for (study_id, series_id), outcome in _run(jobs, workers):
            if isinstance(outcome, str):
                report.failed[str(series_path(root, split, study_id, series_id))] = outcome
            elif outcome < 0:
                report.skipped += 1
            else:
                report.written += 1
                report.files += outcome
            bar.update()
    report.seconds = time.perf_counter() - tic
    for folder, error in report.failed.items():
        warnings.warn(f"{folder}: not cached ({error})", stacklevel=2)
    if state is not None and state.num_processes > 1:
        from accelerate.utils import gather_object

        report = CacheReport.merge(gather_object([report]))
    return report


def _run(jobs: list[tuple], workers: int) -> Iterator[tuple[tuple[int, int], int | str]]:
    if workers <= 0:
        yield from map(_cache_one, jobs)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        # unordered would be faster to start, but map keeps memory flat too: results are a few ints
        yield from pool.map(_cache_one, jobs, chunksize=4)


_STORES: dict[tuple[str, str, str], SeriesStore] = {}  # one per worker process and folder


def _cache_one(job: tuple[str, str, str, int, int]) -> tuple[tuple[int, int], int | str]:
    """(ids, files decoded) for a series written now, (ids, -1) for one already cached, (ids, error)."""
    root, split, cache_dir, study_id, series_id = job
    store = _STORES.get((root, split, cache_dir))
    if store is None:
        # memory_bytes=0: nothing is kept once written (peak memory: the series being decoded)
        store = _STORES[root, split, cache_dir] = SeriesStore(root, split, cache_dir=cache_dir, memory_bytes=0)
    try:
        if store.cached(study_id, series_id):
            return (study_id, series_id), -1
        series = store.get(study_id, series_id)
    except SpineDataError as err:
        return (study_id, series_id), str(err)
    store.forget(study_id, series_id)
    return (study_id, series_id), len(series.files)
