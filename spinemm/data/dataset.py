"""Model-ready samples: one dict per study (CONTRACTS "Sample format"), plus study-level splits.

For each of the three planes the dataset picks one series (its description, checked against the
plane its ImageOrientationPatient shows: :mod:`spinemm.data.planes`), preprocesses it to ``[S, C, H, W]``
(:mod:`spinemm.data.transforms`, optionally through :class:`~spinemm.data.cache.SeriesCache`) and
turns the label coordinates into targets on that stack: ``(slice index in the resampled stack,
x / W_orig, y / H_orig)``.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from spinemm.constants import NUM_TARGETS, PLANES, TARGET_PLANE_INDEX
from spinemm.errors import SpineDataError
from spinemm.text import QUERY_TEXTS

from .cache import SeriesCache
from .planes import assign_by_geometry
from .roi import label_point
from .store import SeriesStore
from .tables import load_tables, series_path
from .transforms import (
    CHANNEL_MODES,
    AugmentConfig,
    PreprocessedSeries,
    augment_plane,
    slice_position,
)

_FRAME_COLUMNS = ("study_id", "target", "label", "series_id", "candidate_series", "instance_number", "x", "y")
#: Targets read on each plane, e.g. ``_PLANE_TARGETS[1]`` = the 5 spinal canal targets.
_PLANE_TARGETS = tuple(
    tuple(t for t, p in enumerate(TARGET_PLANE_INDEX) if p == plane) for plane in range(len(PLANES))
)


@dataclass(frozen=True)
class _Study:
    """What a sample needs from the frame for one study; all arrays aligned with LABEL_COLUMNS."""

    study_id: int
    labels: np.ndarray  # int64 [25]
    coords: np.ndarray  # float64 [25, 3] (instance_number, x, y), NaN where absent
    coord_series: np.ndarray  # int64 [25] labelled (or default) series of each target
    series: tuple[int, int, int]  # chosen series per plane, -1 where the study has none


def _choose_series(series_id: np.ndarray, instance: np.ndarray, candidates: np.ndarray, plane: int) -> int:
    """The series holding most of the plane's label coordinates (ties: lowest id), else the lowest
    candidate series id, else -1. The arrays are one study's, in ``LABEL_COLUMNS`` order."""
    rows = list(_PLANE_TARGETS[plane])
    labelled = [int(s) for s, i in zip(series_id[rows], instance[rows], strict=True) if s >= 0 and not np.isnan(i)]
    if labelled:
        counts = Counter(labelled)
        return min(counts, key=lambda s: (-counts[s], s))
    found = {int(s) for c in candidates[rows] for s in c}
    return min(found) if found else -1


def _study_records(frame: pd.DataFrame, study_ids: list[int]) -> list[_Study]:
    missing = [c for c in _FRAME_COLUMNS if c not in frame.columns]
    if missing:
        raise SpineDataError(f"frame lacks columns {missing}; pass the frame of spinemm.data.load_tables")
    # one sort and plain arrays: per-study pandas selections cost ~6 ms a study
    ordered = frame.sort_values(["study_id", "target"], kind="stable")
    studies = ordered["study_id"].to_numpy(dtype=np.int64)
    targets = ordered["target"].to_numpy(dtype=np.int64)
    labels = ordered["label"].to_numpy(dtype=np.int64)
    series_id = ordered["series_id"].to_numpy(dtype=np.int64)
    coords = ordered[["instance_number", "x", "y"]].to_numpy(dtype=np.float64)
    candidates = ordered["candidate_series"].to_numpy()
    first, index, counts = np.unique(studies, return_index=True, return_counts=True)
    span = {int(s): (int(i), int(i + n)) for s, i, n in zip(first, index, counts, strict=True)}
    records = []
    for study in study_ids:
        lo, hi = span[study]
        if hi - lo != NUM_TARGETS or (targets[lo:hi] != np.arange(NUM_TARGETS)).any():
            raise SpineDataError(
                f"frame rows of study {study}: expected targets 0..{NUM_TARGETS - 1} once each"
            )
        records.append(_Study(
            study_id=study,
            labels=labels[lo:hi],
            coords=coords[lo:hi],
            coord_series=series_id[lo:hi],
            series=tuple(_choose_series(series_id[lo:hi], coords[lo:hi, 0], candidates[lo:hi], p)
                         for p in range(len(PLANES))),
        ))
    return records


class SpineDataset(torch.utils.data.Dataset):
    """One sample per study: three plane stacks, 25 query texts, labels and location targets.

    Args:
        root: data root in the RSNA layout.
        split: ``"train"`` or ``"test"``: which tables and image folder to read.
        study_ids: studies to include (in this order); default all studies of the frame.
        num_slices, image_size: ``S`` and ``H = W`` of every plane stack.
        channels: ``"2.5d"`` (neighbours s-1, s, s+1 of the original stack) or ``"single"``.
        augment: False, True (default :class:`AugmentConfig`) or an :class:`AugmentConfig`.
        cache_dir: a directory (or a :class:`SeriesCache`) for preprocessed series; None decodes
            DICOM on every access (unless ``store`` keeps the series in memory).
        store: the :class:`~spinemm.data.store.SeriesStore` to take series from, shared with the
            other stages of a run (its cache folder is then used, and ``cache_dir`` must be None).
        frame: a :func:`load_tables` frame to use instead of reading ``root``'s tables.
        seed: base seed of the augmentations; sample ``i`` of epoch ``e`` draws from a generator
            seeded with ``(seed, e, i)``, so runs repeat exactly (see :meth:`set_epoch`).
        on_bad_series: ``"raise"`` (default for train: bad data should be seen) or ``"warn"``
            (default for test: an unreadable series becomes a missing plane, named in a warning).
            Label coordinates that point at no slice of their series follow the same policy.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        study_ids: Iterable[int] | None = None,
        num_slices: int = 16,
        image_size: int = 224,
        channels: str = "2.5d",
        augment: bool | AugmentConfig = False,
        cache_dir: str | os.PathLike | SeriesCache | None = None,
        frame: pd.DataFrame | None = None,
        seed: int = 0,
        on_bad_series: str | None = None,
        store: SeriesStore | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if channels not in CHANNEL_MODES:
            raise ValueError(f"channels must be one of {CHANNEL_MODES}, got {channels!r}")
        if int(num_slices) < 1 or int(image_size) < 1:
            raise ValueError(f"num_slices and image_size must be >= 1, got {num_slices}, {image_size}")
        on_bad_series = on_bad_series or ("raise" if split == "train" else "warn")
        if on_bad_series not in ("raise", "warn"):
            raise ValueError(f"on_bad_series must be 'raise' or 'warn', got {on_bad_series!r}")
        self.root = Path(root)
        self.split = split
        self.num_slices, self.image_size, self.channels = int(num_slices), int(image_size), channels
        self.augment = AugmentConfig() if augment is True else (augment or None)
        if store is not None and cache_dir is not None:
            raise ValueError("pass cache_dir or store, not both (the store has its own cache folder)")
        if store is not None and (store.root != self.root or store.split != split):
            raise ValueError(f"the store reads {store.split} of {store.root}, not {split} of {self.root}")
        self.store = store if store is not None else SeriesStore(self.root, split, cache_dir=cache_dir)
        self.cache = self.store.cache
        self.seed, self.epoch = int(seed), 0
        self.on_bad_series = on_bad_series
        self.frame = load_tables(self.root, split) if frame is None else frame
        known = [int(s) for s in pd.unique(self.frame["study_id"])]
        if study_ids is None:
            ids = known
        else:
            ids = [int(s) for s in study_ids]
            unknown = sorted(set(ids) - set(known))
            if unknown:
                raise SpineDataError(f"study ids not in the {split} tables of {self.root}: {unknown[:10]}")
            if len(set(ids)) != len(ids):
                raise ValueError("study_ids has repeated ids")
        self.study_ids = ids
        self._records = _study_records(self.frame, ids)
        self._bad: set[Path] = set()  # series already reported unreadable (warn once, no re-decode)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        planes = np.array([[s >= 0 for s in r.series] for r in self._records]).reshape(-1, len(PLANES))
        present = ", ".join(f"{p}={int(n)}" for p, n in zip(PLANES, planes.sum(axis=0), strict=True))
        cache = str(self.cache.cache_dir) if self.cache else None
        return (
            f"SpineDataset(root={str(self.root)!r}, split={self.split!r}, studies={len(self)}, "
            f"num_slices={self.num_slices}, image_size={self.image_size}, channels={self.channels!r}, "
            f"augment={self.augment is not None}, cache={cache!r}, series per plane: {present})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Draw fresh augmentations for a new epoch. With ``persistent_workers`` the workers keep
        their own copy, so call this before the DataLoader iterator is created."""
        self.epoch = int(epoch)

    def _generator(self, index: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def _policy(self, message: str) -> None:
        if self.on_bad_series == "raise":
            raise SpineDataError(message)
        warnings.warn(message, stacklevel=3)

    def load_series(self, study_id: int, series_id: int) -> PreprocessedSeries | None:
        """The preprocessed series (cached when a cache is set); None for an unreadable series under
        ``on_bad_series="warn"``."""
        path = series_path(self.root, self.split, study_id, series_id)
        if path in self._bad:
            return None
        try:
            return self.store.stack(study_id, series_id, self.num_slices, self.image_size, self.channels)
        except SpineDataError as err:
            if self.on_bad_series == "raise":
                raise
            self._bad.add(path)
            message = f"series {series_id} of study {study_id} is unreadable and treated as missing: {err}"
            warnings.warn(message, stacklevel=2)
            return None

    def _plane_targets(self, rec: _Study, plane: int, series: PreprocessedSeries, series_id: int):
        """(targets [K], sorted-stack index [K], points [K, 2] normalised x, y) of the plane's
        coordinates that lie on ``series``."""
        height, width = series.original_shape
        targets, sources, points = [], [], []
        for t in _PLANE_TARGETS[plane]:
            instance, x, y = rec.coords[t]
            if np.isnan(instance) or rec.coord_series[t] != series_id:
                continue
            source = series.index_of_instance(int(instance))
            where = f"label coordinate of study {rec.study_id}, target {t}, series {series_id}"
            if source is None:
                self._policy(f"{where}: instance {int(instance)} is not a slice of the series")
                continue
            own = (height, width) if series.source_shapes is None else tuple(series.source_shapes[source])
            point, problem = label_point(x, y, own, (height, width))  # in the pixels of its own slice
            if point is None:
                self._policy(f"{where}: {problem}")
                continue
            targets.append(t)
            sources.append(source)
            points.append((point[0] / width, point[1] / height))
        return targets, sources, torch.tensor(points, dtype=torch.float32).reshape(-1, 2)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self._records[index]
        num_planes, size = len(PLANES), self.image_size
        image = torch.zeros(num_planes, self.num_slices, 3, size, size)
        plane_mask = torch.zeros(num_planes, dtype=torch.bool)
        location = torch.zeros(NUM_TARGETS, 3)
        location_mask = torch.zeros(NUM_TARGETS, dtype=torch.bool)
        meta: dict[str, Any] = {
            "study_id": rec.study_id,
            "series_ids": [-1] * num_planes,
            "instance_numbers": [np.zeros(0, dtype=np.int64) for _ in range(num_planes)],
            "slice_indices": [np.zeros(0, dtype=np.int64) for _ in range(num_planes)],  # shown slices' sorted index
            "source_instance_numbers": [np.zeros(0, dtype=np.int64) for _ in range(num_planes)],
            "original_shape": [(0, 0)] * num_planes,
            "pixel_spacing": [(0.0, 0.0)] * num_planes,
        }
        generator = self._generator(index) if self.augment is not None else None
        loaded = {s: self.load_series(rec.study_id, s) for s in rec.series if s >= 0}
        loaded = {s: v for s, v in loaded.items() if v is not None}
        # the plane each series shows is read from its geometry, not taken from its description
        chosen = assign_by_geometry(rec.study_id, [s if s in loaded else -1 for s in rec.series],
                                    {s: v.plane for s, v in loaded.items()})
        for plane, series_id in enumerate(chosen):
            series = loaded.get(series_id)
            if series is None:
                continue
            targets, sources, points = self._plane_targets(rec, plane, series, series_id)
            stack, indices, instances = series.image.float(), series.indices, series.instance_numbers
            valid = torch.ones(len(targets), dtype=torch.bool)
            if generator is not None:
                stack, indices, instances, points, valid = augment_plane(
                    stack, indices, instances, points, valid, generator, self.augment
                )
            for k, (t, source) in enumerate(zip(targets, sources, strict=True)):
                position = slice_position(indices, source, series.num_source_slices)
                if valid[k] and position is not None:
                    location[t] = torch.tensor([position, float(points[k, 0]), float(points[k, 1])])
                    location_mask[t] = True
            image[plane] = stack
            plane_mask[plane] = True
            meta["series_ids"][plane] = series_id
            meta["instance_numbers"][plane] = np.asarray(instances, dtype=np.int64)
            meta["slice_indices"][plane] = np.asarray(indices, dtype=np.int64)
            meta["source_instance_numbers"][plane] = np.asarray(series.source_instance_numbers, dtype=np.int64)
            meta["original_shape"][plane] = series.original_shape
            meta["pixel_spacing"][plane] = series.pixel_spacing
        return {
            "image": image,
            "plane_mask": plane_mask,
            "text": list(QUERY_TEXTS),
            "label": torch.from_numpy(rec.labels.copy()),
            "location": location,
            "location_mask": location_mask,
            "meta": meta,
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch: tensors on a new dim 0, ``text`` a list of lists, ``meta`` a list."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    batch: dict[str, Any] = {
        key: torch.stack([s[key] for s in samples])
        for key in ("image", "plane_mask", "label", "location", "location_mask")
    }
    batch["text"] = [list(s["text"]) for s in samples]
    batch["meta"] = [s["meta"] for s in samples]
    return batch


def _unique_ids(study_ids) -> np.ndarray:
    ids = np.unique(np.asarray(list(study_ids), dtype=np.int64))  # sorted: the input order cannot matter
    if ids.size < 2:
        raise ValueError(f"need at least 2 distinct study ids to split, got {ids.size}")
    return ids


def study_split(study_ids, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train_ids, val_ids)``: a random, seeded split of the distinct study ids (never of rows).

    Repeated ids (e.g. a frame's ``study_id`` column) collapse to one study; both lists are sorted.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids = _unique_ids(study_ids)
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[order[n_val:]].tolist()), sorted(ids[order[:n_val]].tolist())


def kfold_split(study_ids, k: int, fold: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train_ids, val_ids)`` of fold ``fold`` of a seeded ``k``-fold split of the distinct studies.

    The k validation sets are disjoint and together cover every study; sizes differ by at most one.
    """
    ids = _unique_ids(study_ids)
    if not 2 <= k <= len(ids):
        raise ValueError(f"k must be in [2, {len(ids)}] for {len(ids)} studies, got {k}")
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in [0, {k}), got {fold}")
    parts = np.array_split(np.random.default_rng(seed).permutation(len(ids)), k)
    val = ids[parts[fold]]
    return sorted(np.setdiff1d(ids, val).tolist()), sorted(val.tolist())
