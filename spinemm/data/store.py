"""One place every stage takes its series from: each series read once per process.

The staged pipeline reads the same series many times over: the first stage's low-resolution
stacks, the level locator's sagittal slices, the grader's and pretraining's crops, the report's
overlays. :class:`SeriesStore` decodes each series once, windows it to [0, 1] (the series' own
0.5/99.5 percentiles, float16: what every stage reads) and keeps it

* in memory, in a least-recently-used map bounded in bytes (``memory_bytes``), and
* when a ``cache_dir`` is given, on disk in the content-keyed safetensors cache of
  :class:`~spinemm.data.cache.SeriesCache`, at full resolution with its geometry, so a later run
  (or a later stage whose series fell out of memory) opens no DICOM file at all.

:meth:`SeriesStore.stack` gives the first stage's low-resolution stacks as a view on the same
series (stored in the same cache folder under their own keys). Series paths come from integer ids
through :func:`~spinemm.data.tables.series_path`, never from a DICOM tag or CSV text.

A store is cheap to pickle: DataLoader workers get an empty memory map and the same disk cache.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors

from ..errors import SpineDataError
from .cache import FORMAT_VERSION, SeriesCache, key_context
from .series import Series
from .tables import series_path
from .transforms import PreprocessedSeries, intensity_window, to_unit_float16

__all__ = ["SeriesStore", "windowed"]

DEFAULT_MEMORY_BYTES = 1 << 30  # 1 GiB: about 40 real-size (512 px, 50 slice) series


def windowed(series: Series) -> Series:
    """``series`` with its volume windowed to [0, 1] as float16 (``windowed=True``); the geometry
    is shared, not copied. A series that is already windowed is returned as it is."""
    if series.windowed:
        return series
    unit = to_unit_float16(series.volume, intensity_window(series.volume))
    return Series(volume=unit, instance_numbers=series.instance_numbers, instance_to_index=series.instance_to_index,
                  positions=series.positions, orientation=series.orientation, normal=series.normal,
                  pixel_spacing=series.pixel_spacing, slice_spacing=series.slice_spacing, files=series.files,
                  orientations=series.orientations, windowed=True, source_shapes=series.source_shapes,
                  nominal=series.nominal)


class SeriesStore:
    """The series of one split of an RSNA-layout ``root``, each decoded once (module docstring).

    Counters: ``decodes`` (series read from DICOM), ``disk_hits`` (series read from the cache
    folder), ``memory_hits``.
    """

    def __init__(self, root: str | Path, split: str = "train", *, cache_dir: str | Path | SeriesCache | None = None,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root, self.split = Path(root), split
        self.cache = cache_dir if isinstance(cache_dir, SeriesCache) or cache_dir is None else SeriesCache(cache_dir)
        self.memory_bytes = int(memory_bytes)
        self._memory: OrderedDict[tuple[int, int], Series] = OrderedDict()
        self._held = 0
        self._bad: dict[tuple[int, int], str] = {}  # unreadable series: the error, never read again
        self._warned: set[tuple[int, int, str]] = set()  # (study, series, action) already warned about
        self.decodes = self.disk_hits = self.memory_hits = 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)  # workers start with an empty memory map
        state["_memory"], state["_held"] = OrderedDict(), 0
        state["_warned"] = set()
        return state

    def __repr__(self) -> str:
        cache = str(self.cache.cache_dir) if self.cache else None
        return (f"SeriesStore({str(self.root)!r}, split={self.split!r}, cache_dir={cache!r}, "
                f"in memory={len(self._memory)} series / {self._held / 2**20:.0f} MiB, decodes={self.decodes}, "
                f"disk_hits={self.disk_hits}, memory_hits={self.memory_hits})")

    def path(self, study_id: int, series_id: int) -> Path:
        """The series folder (from integer ids only)."""
        return series_path(self.root, self.split, int(study_id), int(series_id))

    def get(self, study_id: int, series_id: int) -> Series:
        """The windowed series (:func:`windowed`); raises :class:`SpineDataError` naming the folder
        when it cannot be read (and again, without re-reading, on every later call)."""
        key = (int(study_id), int(series_id))
        if key in self._memory:
            self.memory_hits += 1
            self._memory.move_to_end(key)
            return self._memory[key]
        if key in self._bad:
            raise SpineDataError(self._bad[key])
        try:
            series = self._load(self.path(*key))
        except SpineDataError as err:
            self._bad[key] = str(err)
            raise
        self._remember(key, series)
        return series

    def find(self, study_id: int, series_id: int, action: str = "used") -> Series | None:
        """:meth:`get`, or None with a warning naming the series and what was not done (``action``,
        e.g. "graded") when it cannot be read; warned once per series and action."""
        key = (int(study_id), int(series_id))
        try:
            return self.get(*key)
        except SpineDataError as err:
            if (*key, action) not in self._warned:
                self._warned.add((*key, action))
                warnings.warn(f"study {key[0]} series {key[1]}: not {action} ({err})", stacklevel=2)
            return None

    def stack(self, study_id: int, series_id: int, num_slices: int, image_size: int,
              channels: str = "2.5d") -> PreprocessedSeries:
        """The first stage's low-resolution stack of a series (:func:`~spinemm.data.transforms.preprocess_series`),
        from the cache folder when one is set, else made from :meth:`get`."""
        from .transforms import preprocess_series

        if self.cache is None:
            return preprocess_series(self.get(study_id, series_id), num_slices, image_size, channels)
        return self.cache.load(self.path(study_id, series_id), num_slices, image_size, channels,
                               source=lambda: self.get(study_id, series_id))

    def cached(self, study_id: int, series_id: int) -> bool:
        """Whether the cache folder holds the series (its DICOM bytes are not read while the
        cache's stat index vouches for them)."""
        return self.cache is not None and self._entry_path(self.path(study_id, series_id)).exists()

    def _entry_path(self, series_dir: Path) -> Path:
        key = _entry_key(self.cache.content_hash(series_dir))
        return self.cache.cache_dir / key[:2] / f"{key}.safetensors"

    def forget(self, study_id: int, series_id: int) -> None:
        """Drop a series from memory (it stays in the cache folder, when there is one)."""
        series = self._memory.pop((int(study_id), int(series_id)), None)
        if series is not None:
            self._held -= series.volume.nbytes

    def forget_study(self, study_id: int) -> None:
        """Drop every series of a study from memory: a run that is done with a study (predict
        never comes back to one) keeps its memory to the studies still in hand."""
        for key in [k for k in self._memory if k[0] == int(study_id)]:
            self.forget(*key)

    def _remember(self, key: tuple[int, int], series: Series) -> None:
        self._memory[key] = series
        self._held += series.volume.nbytes
        while self._held > self.memory_bytes and len(self._memory) > 1:
            _, old = self._memory.popitem(last=False)
            self._held -= old.volume.nbytes

    # ------------------------------------------------------------------------- disk entries
    def _load(self, series_dir: Path) -> Series:
        from .dicom import read_series  # deferred: pydicom is only needed when decoding

        if self.cache is None:
            self.decodes += 1
            return read_series(series_dir, windowed=True)
        path = self._entry_path(series_dir)
        if path.exists():
            series = _read_entry(path, series_dir)
            if series is not None:
                self.disk_hits += 1
                return series
        self.decodes += 1
        series = read_series(series_dir, windowed=True)
        _write_entry(self.cache, path, series)
        return series


def _entry_key(content: str) -> str:
    """Cache key of a whole windowed series (distinct from every low-resolution stack key)."""
    params = {**key_context(), "kind": "windowed-series"}
    blob = content + json.dumps(params, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=20).hexdigest()


def _write_entry(cache: SeriesCache, path: Path, series: Series) -> None:
    tensors = {
        "volume": torch.from_numpy(np.ascontiguousarray(series.volume, dtype=np.float16)),
        "instance_numbers": torch.from_numpy(np.ascontiguousarray(series.instance_numbers, dtype=np.int64)),
        "positions": torch.from_numpy(np.ascontiguousarray(series.positions, dtype=np.float64)),
        "orientation": torch.from_numpy(np.ascontiguousarray(series.orientation, dtype=np.float64)),
        "normal": torch.from_numpy(np.ascontiguousarray(series.normal, dtype=np.float64)),
    }
    if series.orientations is not None:  # blocks of differing orientation (per-level oblique axials)
        tensors["orientations"] = torch.from_numpy(np.ascontiguousarray(series.orientations, dtype=np.float64))
    if series.source_shapes is not None:  # slices of another size, resampled: their own sizes
        tensors["source_shapes"] = torch.from_numpy(np.ascontiguousarray(series.source_shapes, dtype=np.int64))
    meta = {"version": FORMAT_VERSION, "pixel_spacing": list(series.pixel_spacing),
            "slice_spacing": series.slice_spacing, "files": [p.name for p in series.files],
            "nominal": bool(series.nominal)}
    cache.publish(path, save_tensors(tensors, metadata={"spinemm": json.dumps(meta)}))


def _read_entry(path: Path, series_dir: Path) -> Series | None:
    """The entry at ``path``, or None (with a warning) when it is truncated or malformed."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["spinemm"])
            arrays = {name: fh.get_tensor(name).numpy() for name in fh.keys()}  # noqa: SIM118 (safe_open API)
        if meta["version"] != FORMAT_VERSION:
            raise ValueError(f"format version {meta['version']}, expected {FORMAT_VERSION}")
        volume, instances = arrays["volume"], arrays["instance_numbers"]
        if volume.ndim != 3 or volume.dtype != np.float16 or instances.shape != volume.shape[:1]:
            raise ValueError(f"volume {volume.dtype} {volume.shape} with {instances.shape} instance numbers")
        if arrays["positions"].shape != (len(volume), 3) or len(meta["files"]) != len(volume):
            raise ValueError("geometry does not match the volume")
        if any(Path(name).name != name for name in meta["files"]):
            raise ValueError("file names with a folder part")
        orientations = arrays.get("orientations")
        if orientations is not None and orientations.shape != (len(volume), 2, 3):
            raise ValueError(f"orientations of shape {orientations.shape} for {len(volume)} slices")
        shapes = arrays.get("source_shapes")
        if shapes is not None and (shapes.shape != (len(volume), 2) or (shapes < 1).any()):
            raise ValueError(f"source_shapes of shape {shapes.shape} for {len(volume)} slices")
        return Series(volume=volume, instance_numbers=instances,
                      instance_to_index={int(n): i for i, n in enumerate(instances)},
                      positions=arrays["positions"], orientation=arrays["orientation"], normal=arrays["normal"],
                      pixel_spacing=tuple(float(v) for v in meta["pixel_spacing"]),
                      slice_spacing=float(meta["slice_spacing"]),
                      files=[series_dir / name for name in meta["files"]], orientations=orientations,
                      windowed=True, source_shapes=shapes, nominal=bool(meta["nominal"]))
    except Exception as err:  # safetensors raises its own error types; any failure means "rebuild"
        warnings.warn(f"corrupt cache entry {path} ({type(err).__name__}: {err}); rebuilding it", stacklevel=3)
        return None
