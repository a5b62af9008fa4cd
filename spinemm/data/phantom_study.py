"""One phantom study: its anatomy scanned into its series, written as DICOM, and its label points.

:func:`map_studies` writes many studies in worker processes. Every study has its own random
stream, so the output does not depend on which process writes it.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinemm.constants import CONDITION_NAMES, LEVEL_NAMES, PLANES, TARGET_PLANE_INDEX

from .phantom_anatomy import finding_point, sample_anatomy
from .phantom_dicom import acquire, locate, make_uid, plan_axial, plan_sagittal, write_series
from .tables import series_path

__all__ = ["Scan", "StudyJob", "map_studies"]


@dataclass(frozen=True)
class Scan:
    """How every study of a phantom is scanned (the same for all its studies)."""

    image_size: int  # square matrix of the plain phantom
    seed: int  # the phantom's seed (its UIDs derive from it)
    axial_slices: tuple[int, int]  # fewest and most Axial T2 slices per level
    syntaxes: tuple[str, ...] | None = None  # None: plain phantom; else the real set's variety may write these


@dataclass(frozen=True)
class StudyJob:
    """One study to write: a worker's unit."""

    root: Path
    split: str
    study_id: int
    series: list[tuple[int, str]]  # (series_id, description)
    severity: np.ndarray  # [25] latent severity
    stream: np.random.SeedSequence  # the study's own random stream
    oblique: bool  # Axial T2 as per-level oblique blocks
    labelled: np.ndarray | None  # [25] targets with a coordinate row (train); None for a test study


def write_study(job: StudyJob, scan: Scan) -> dict[str, tuple]:
    """Scan one study and write its series. Returns, per plane, ``(series_id, plan, anatomy)`` of
    its first series: the one labelled."""
    rng = np.random.default_rng(job.stream)
    anat = sample_anatomy(rng, job.severity.reshape(5, 5))
    study_uid = make_uid(scan.seed, job.study_id)
    primary: dict[str, tuple] = {}
    for number, (series_id, description) in enumerate(job.series, start=1):
        if description == "Axial T2":
            plan = plan_axial(rng, anat, scan.image_size, oblique=job.oblique, per_level=scan.axial_slices,
                              syntaxes=scan.syntaxes)
        else:
            plan = plan_sagittal(rng, anat, description, scan.image_size, syntaxes=scan.syntaxes)
        stored, slope, intercept = acquire(rng, anat, plan)
        ids = {
            "study_id": job.study_id,
            "series_id": series_id,
            "series_number": number,
            "study_uid": study_uid,
            "series_uid": make_uid(scan.seed, job.study_id, series_id),
            "frame_uid": make_uid(scan.seed, job.study_id, "frame"),
        }
        write_series(series_path(job.root, job.split, job.study_id, series_id), plan, stored, (slope, intercept),
                     ids, rng)
        primary.setdefault(description, (series_id, plan, anat))
    return primary


def _study_job(args: tuple[StudyJob, Scan]) -> list[tuple]:
    """Write one study; returns its coordinate rows (none for a test study)."""
    job, scan = args
    primary = write_study(job, scan)
    return [] if job.labelled is None else _coordinate_rows(job.study_id, primary, job.labelled)


def map_studies(jobs: list[StudyJob], scan: Scan, workers: int | None) -> Iterator[list[tuple]]:
    """Write ``jobs`` in order, in ``workers`` processes (None: one per core, and at least 8 studies
    each, since a process costs about a second to start); yields each study's coordinate rows."""
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = max(1, min(cores, len(jobs) // 8))
    workers = min(len(jobs), workers)
    args = [(job, scan) for job in jobs]
    if workers <= 1:
        yield from map(_study_job, args)
        return
    # spawn, not fork: the caller may hold torch's threads, and a forked child of a threaded
    # process can deadlock
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_study_job, args, chunksize=4)


def _coordinate_rows(study_id: int, primary: dict[str, tuple], labelled: np.ndarray) -> list[tuple]:
    """Coordinate rows of one train study for the targets flagged in ``labelled [25]``, in the
    pixels of the labelled series' own matrix."""
    rows = []
    for t in np.flatnonzero(labelled):
        condition, level = divmod(int(t), len(LEVEL_NAMES))
        plane = PLANES[TARGET_PLANE_INDEX[t]]
        if plane not in primary:
            continue
        series_id, plan, anat = primary[plane]
        k, x, y = locate(plan, finding_point(anat, condition, level))
        rows.append((study_id, series_id, int(plan.instance_numbers[k]), CONDITION_NAMES[condition],
                     LEVEL_NAMES[level], round(x, 4), round(y, 4)))
    return rows
