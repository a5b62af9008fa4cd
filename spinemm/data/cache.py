"""On-disk cache of preprocessed series, keyed by the DICOM bytes and the preprocessing parameters.

Decoding DICOM dominates a data epoch, and :func:`~spinemm.data.transforms.preprocess_series` is
deterministic, so its result is stored once and reused by every later epoch, fold and run.

Layout under ``cache_dir``::

    ab/abcdef....safetensors    one entry: arrays + a JSON metadata string in the safetensors header
    index/<path hash>.json      per series dir: stat signature -> content hash (skips re-hashing)

* Key = blake2b(content hash of the series' files, preprocessing parameters, format version). A
  changed file changes the content hash, so a stale entry is never found (old entries stay on disk
  until the directory is deleted).
* The stat index lets a hit skip reading the DICOM bytes: if file names, sizes and mtimes match the
  recorded ones, the recorded content hash is reused; otherwise the files are hashed again. Like
  git's "racy" check, a signature recorded within two seconds of a file's mtime is not trusted (a
  same-size rewrite inside one timestamp tick would otherwise go unseen).
* Safe formats only (safetensors + JSON, never pickle). Every write goes to a temp file in the same
  directory and is published with ``os.replace``, so DataLoader workers racing on one entry each
  see a complete file. A truncated or malformed entry is a miss: warned about and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors

from .series import Series, series_files
from .transforms import INTENSITY_PERCENTILES, PreprocessedSeries, preprocess_series

#: Bump when the preprocessing or the entry layout changes: old entries are then never read.
FORMAT_VERSION = 2  # 2: stacks are made from the float16 windowed series of SeriesStore
_RACY_NS = 2_000_000_000
_ARRAYS = ("image", "indices", "instance_numbers", "source_instance_numbers")


def stat_signature(files: list[Path]) -> list[list[Any]]:
    """``[[name, size, mtime_ns], ...]``: cheap to compute, changes when a file is rewritten."""
    out = []
    for path in files:
        st = path.stat()
        out.append([path.name, st.st_size, st.st_mtime_ns])
    return out


def content_digest(files: list[Path]) -> str:
    """blake2b over each file's name, length and bytes, in the given (sorted) order."""
    h = hashlib.blake2b(digest_size=32)
    for path in files:
        data = path.read_bytes()
        h.update(path.name.encode())
        h.update(len(data).to_bytes(8, "little"))  # length prefix: no two listings hash alike
        h.update(data)
    return h.hexdigest()


def entry_key(content: str, num_slices: int, image_size: int, channels: str) -> str:
    """Cache key of one series' content under one set of preprocessing parameters."""
    params = {
        "version": FORMAT_VERSION,
        "num_slices": int(num_slices),
        "image_size": int(image_size),
        "channels": channels,
        "percentiles": list(INTENSITY_PERCENTILES),
    }
    blob = content + json.dumps(params, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=20).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file next to ``path``, then rename over it (atomic on POSIX and Windows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SeriesCache:
    """Content-keyed store of :class:`PreprocessedSeries` (see the module docstring).

    Counters (per process: each DataLoader worker holds its own copy): ``hits``, ``misses``,
    ``decodes`` (``read_series`` calls), ``hashes`` (series whose bytes were hashed) and
    ``corrupt`` (unreadable entries replaced).
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.reset_stats()

    def reset_stats(self) -> None:
        """Set every counter to zero."""
        self.hits = self.misses = self.decodes = self.hashes = self.corrupt = 0

    def stats(self) -> dict[str, int]:
        """The counters as a dict."""
        return {k: getattr(self, k) for k in ("hits", "misses", "decodes", "hashes", "corrupt")}

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.stats().items())
        return f"SeriesCache({str(self.cache_dir)!r}, {counts})"

    def load(
        self, series_dir: str | os.PathLike, num_slices: int, image_size: int, channels: str = "2.5d",
        source: Callable[[], Series] | None = None,
    ) -> PreprocessedSeries:
        """The preprocessed series, from the cache when its files and parameters match.

        On a miss the series comes from ``source()`` (a :class:`~spinemm.data.store.SeriesStore`
        passes its own copy, so the series is decoded once for every stage) or else
        ``read_series`` (which raises SpineDataError for bad DICOM); it is preprocessed and stored.
        """
        from .dicom import read_series  # deferred: dicom.py pulls in pydicom

        series_dir = Path(series_dir)
        key = entry_key(self.content_hash(series_dir), num_slices, image_size, channels)
        path = self.cache_dir / key[:2] / f"{key}.safetensors"
        if path.exists():
            entry = self._read(path, (num_slices, 3, image_size, image_size))
            if entry is not None:
                self.hits += 1
                return entry
        self.misses += 1
        series = read_series(series_dir) if source is None else source()
        self.decodes += 1
        entry = preprocess_series(series, num_slices, image_size, channels)
        self._write(path, entry, series_dir)
        return entry

    def content_hash(self, series_dir: Path) -> str:
        """Hash of the series' files, reusing the recorded one while the stat signature matches."""
        files = series_files(series_dir)
        signature = stat_signature(files)  # taken before reading: a concurrent edit forces a re-hash
        index = (
            self.cache_dir
            / "index"
            / (hashlib.blake2b(str(series_dir.resolve()).encode(), digest_size=16).hexdigest() + ".json")
        )
        try:
            record = json.loads(index.read_text())
            if record["signature"] == signature and record["trusted"]:
                return str(record["content"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no record yet, or an unreadable one: hash the bytes and write a fresh record
        content = content_digest(files)
        self.hashes += 1
        now = time.time_ns()
        record = {
            "series_dir": str(series_dir.resolve()),
            "signature": signature,
            "content": content,
            "trusted": all(now - mtime > _RACY_NS for _, _, mtime in signature),
        }
        write_atomic(index, json.dumps(record).encode())
        return content

    def _write(self, path: Path, entry: PreprocessedSeries, series_dir: Path) -> None:
        tensors = {
            "image": entry.image.to(torch.float16).contiguous(),
            "indices": torch.from_numpy(np.ascontiguousarray(entry.indices, dtype=np.int64)),
            "instance_numbers": torch.from_numpy(
                np.ascontiguousarray(entry.instance_numbers, dtype=np.int64)
            ),
            "source_instance_numbers": torch.from_numpy(
                np.ascontiguousarray(entry.source_instance_numbers, dtype=np.int64)
            ),
        }
        meta = {
            "version": FORMAT_VERSION,
            "series_dir": str(series_dir),
            "original_shape": list(entry.original_shape),
            "pixel_spacing": list(entry.pixel_spacing),
            "slice_spacing": entry.slice_spacing,
        }
        write_atomic(path, save_tensors(tensors, metadata={"spinemm": json.dumps(meta)}))

    def _read(self, path: Path, image_shape: tuple[int, int, int, int]) -> PreprocessedSeries | None:
        """The entry at ``path``, or None (with a warning) when it is truncated or malformed."""
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads(fh.metadata()["spinemm"])
                arrays = {name: fh.get_tensor(name) for name in _ARRAYS}
            if meta["version"] != FORMAT_VERSION:
                raise ValueError(f"format version {meta['version']}, expected {FORMAT_VERSION}")
            image = arrays["image"]
            if tuple(image.shape) != image_shape or image.dtype != torch.float16:
                raise ValueError(
                    f"image is {image.dtype} {tuple(image.shape)}, expected float16 {image_shape}"
                )
            num_source = arrays["source_instance_numbers"].shape[0]
            for name in ("indices", "instance_numbers"):
                if tuple(arrays[name].shape) != image_shape[:1]:
                    raise ValueError(
                        f"{name} has shape {tuple(arrays[name].shape)}, expected {image_shape[:1]}"
                    )
            if not bool(((arrays["indices"] >= 0) & (arrays["indices"] < num_source)).all()):
                raise ValueError("slice indices outside the source stack")
            height, width = (int(v) for v in meta["original_shape"])
            row_mm, col_mm = (float(v) for v in meta["pixel_spacing"])
            return PreprocessedSeries(
                image=image,
                indices=arrays["indices"].numpy(),
                instance_numbers=arrays["instance_numbers"].numpy(),
                source_instance_numbers=arrays["source_instance_numbers"].numpy(),
                original_shape=(height, width),
                pixel_spacing=(row_mm, col_mm),
                slice_spacing=float(meta["slice_spacing"]),
            )
        except Exception as err:  # safetensors raises its own error types; any failure means "rebuild"
            self.corrupt += 1
            warnings.warn(
                f"corrupt cache entry {path} ({type(err).__name__}: {err}); rebuilding it", stacklevel=3
            )
            return None
