"""On-disk cache of preprocessed series, keyed by the DICOM bytes and the preprocessing parameters.

Decoding DICOM dominates a data epoch, and :func:`~spinemm.data.transforms.preprocess_series` is
deterministic, so its result is stored once and reused by every later epoch, fold and run.

Layout under ``cache_dir``::

    ab/abcdef....safetensors    one entry: arrays + a JSON metadata string in the safetensors header
    index/<path hash>.json      per series dir: stat signature -> content hash (skips re-hashing)

* Key = blake2b(content hash of the series' files, preprocessing parameters, and what else decides
  an entry's values: the format version, the spinemm and pydicom versions and the intensity
  percentiles; :func:`key_context`). A changed file, setting or library version gives a new key, so a
  stale entry is never found (old entries stay on disk until the directory is deleted).
* The stat index lets a hit skip reading the DICOM bytes: if file names, sizes and mtimes match the
  recorded ones, the recorded content hash is reused; otherwise the files are hashed again. Like
  git's "racy" check, a signature recorded within two seconds of a file's mtime is not trusted (a
  same-size rewrite inside one timestamp tick would otherwise go unseen).
* The trade-off: a file rewritten with the same size *and* its old mtime (``cp -p``, ``rsync -t``,
  ``touch -r``, a restored backup, a filesystem with coarse timestamps) looks unchanged, and its old
  entry is served. ``SeriesCache(..., verify=True)`` trusts no signature: every lookup re-reads and
  re-hashes the files (the cost of reading the bytes, which the index exists to save), and
  :meth:`SeriesCache.verify` re-hashes given series folders once, reporting and repairing records
  the signature had let go stale.
* Safe formats only (safetensors + JSON, never pickle). Every write goes to a temp file in the same
  directory and is published with ``os.replace``, so DataLoader workers racing on one entry each
  see a complete file. A truncated or malformed entry is a miss: warned about and rewritten.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable
from functools import lru_cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors

from ..errors import SpineOutputError
from ..files import write_atomic
from . import transforms
from .series import GEOMETRIC_PLANES, Series, series_files
from .transforms import PreprocessedSeries, preprocess_series

#: Bump when the preprocessing or the entry layout changes: old entries are then never read.
FORMAT_VERSION = 5  # 2: stacks from SeriesStore's float16 series; 3: per-slice orientations; 4: the
# window from sample_percentiles (np.percentile to float rounding); 5: each slice's own size
# (source_shapes) and the plane read from ImageOrientationPatient
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


@lru_cache(maxsize=1)
def _pydicom_version() -> str:
    try:
        return package_version("pydicom")
    except PackageNotFoundError:  # pragma: no cover - pydicom is a dependency
        return "unknown"


def key_context() -> dict[str, Any]:
    """What decides an entry's values besides the files and the call's settings: the entry format,
    the spinemm version (its preprocessing), the pydicom version (its decoders) and the intensity
    window. Read at each call, so a change takes effect without a restart."""
    import spinemm

    return {
        "version": FORMAT_VERSION,
        "spinemm": spinemm.__version__,
        "pydicom": _pydicom_version(),
        "percentiles": list(transforms.INTENSITY_PERCENTILES),
        "percentile_samples": transforms.PERCENTILE_SAMPLES,
    }


def entry_key(content: str, num_slices: int, image_size: int, channels: str) -> str:
    """Cache key of one series' content under one set of preprocessing parameters."""
    params = {
        **key_context(),
        "num_slices": int(num_slices),
        "image_size": int(image_size),
        "channels": channels,
    }
    blob = content + json.dumps(params, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=20).hexdigest()


class SeriesCache:
    """Content-keyed store of :class:`PreprocessedSeries` (see the module docstring).

    ``verify=True``: re-hash the files on every lookup instead of trusting the stat index (see the
    module docstring for the trade-off).

    Counters (per process: each DataLoader worker holds its own copy): ``hits``, ``misses``,
    ``decodes`` (``read_series`` calls), ``hashes`` (series whose bytes were hashed) and ``corrupt``
    (unreadable entries replaced), as :meth:`stats`; plus ``stale``: index records whose signature
    matched files whose content had changed (found only when verifying).
    """

    def __init__(self, cache_dir: str | os.PathLike, *, verify: bool = False) -> None:
        self.cache_dir = Path(cache_dir)
        if not self.cache_dir.is_dir():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.verify_content = bool(verify)
        # A read-only folder (a Kaggle input dataset, a shared cache) is read and never written:
        # what it lacks is made in memory. A write refused later switches to the same mode.
        self.read_only = not os.access(self.cache_dir, os.W_OK)
        self.reset_stats()

    def publish(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` in the cache folder, unless the folder is read-only (then,
        or when the write is refused for want of permission, nothing is written; warned once)."""
        if self.read_only:
            return
        try:
            write_atomic(path, data)
        except SpineOutputError as err:
            cause = err.__cause__
            if not (isinstance(cause, PermissionError) or getattr(cause, "errno", None) == errno.EROFS):
                raise
            self.read_only = True
            warnings.warn(f"{self.cache_dir} is read-only ({cause.strerror}): the cache is read, and what it "
                          f"lacks is made in memory without being stored", stacklevel=3)

    def reset_stats(self) -> None:
        """Set every counter to zero."""
        self.hits = self.misses = self.decodes = self.hashes = self.corrupt = self.stale = 0

    def stats(self) -> dict[str, int]:
        """The counters as a dict."""
        return {k: getattr(self, k) for k in ("hits", "misses", "decodes", "hashes", "corrupt")}

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.stats().items())
        verify = ", verify=True" if self.verify_content else ""
        return f"SeriesCache({str(self.cache_dir)!r}{verify}, {counts})"

    def verify(self, series_dirs: Iterable[str | os.PathLike]) -> dict[str, list[str]]:
        """Re-hash each series folder's files, whatever the stat index says, and repair its record.

        Returns the folders by outcome: ``"ok"`` (the record held this content), ``"stale"`` (the
        record's signature matched but the content had changed: a rewrite the stat check cannot
        see; a warning names it, and later lookups now find the right entry), ``"new"`` (no
        trusted record yet). Unreadable folders raise SpineDataError as in :meth:`load`.
        """
        out: dict[str, list[str]] = {"ok": [], "stale": [], "new": []}
        for series_dir in series_dirs:
            outcome = self._rehash(Path(series_dir))[1]
            out[outcome].append(str(series_dir))
        return out

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
        """Hash of the series' files, reusing the recorded one while the stat signature matches
        (always re-hashed with ``verify=True``)."""
        if self.verify_content:
            return self._rehash(series_dir)[0]
        files = series_files(series_dir)
        signature = stat_signature(files)  # taken before reading: a concurrent edit forces a re-hash
        record = self._record(series_dir)
        if record is not None and record["signature"] == signature and record["trusted"]:
            return str(record["content"])
        return self._hash_and_record(series_dir, files, signature)

    def _index_path(self, series_dir: Path) -> Path:
        name = hashlib.blake2b(str(series_dir.resolve()).encode(), digest_size=16).hexdigest()
        return self.cache_dir / "index" / f"{name}.json"

    def _record(self, series_dir: Path) -> dict[str, Any] | None:
        try:
            record = json.loads(self._index_path(series_dir).read_text())
            return {k: record[k] for k in ("signature", "content", "trusted")}
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no record yet, or an unreadable one: the caller hashes the bytes

    def _rehash(self, series_dir: Path) -> tuple[str, str]:
        """(content hash, outcome) for :meth:`verify`: the bytes hashed whatever the index says."""
        files = series_files(series_dir)
        signature = stat_signature(files)
        record = self._record(series_dir)
        content = self._hash_and_record(series_dir, files, signature)
        if record is None or not record["trusted"] or record["signature"] != signature:
            return content, "new"
        if record["content"] == content:
            return content, "ok"
        self.stale += 1
        warnings.warn(
            f"{series_dir}: files changed without a change of name, size or mtime; the cache index "
            f"had recorded their old content (now re-hashed and repaired)",
            stacklevel=3,
        )
        return content, "stale"

    def _hash_and_record(self, series_dir: Path, files: list[Path], signature: list[list[Any]]) -> str:
        content = content_digest(files)
        self.hashes += 1
        now = time.time_ns()
        record = {
            "series_dir": str(series_dir.resolve()),
            "signature": signature,
            "content": content,
            "trusted": all(now - mtime > _RACY_NS for _, _, mtime in signature),
        }
        self.publish(self._index_path(series_dir), json.dumps(record).encode())
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
            "plane": entry.plane,
        }
        if entry.source_shapes is not None:
            tensors["source_shapes"] = torch.from_numpy(np.ascontiguousarray(entry.source_shapes, dtype=np.int64))
        self.publish(path, save_tensors(tensors, metadata={"spinemm": json.dumps(meta)}))

    def _read(self, path: Path, image_shape: tuple[int, int, int, int]) -> PreprocessedSeries | None:
        """The entry at ``path``, or None (with a warning) when it is truncated or malformed."""
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads(fh.metadata()["spinemm"])
                arrays = {name: fh.get_tensor(name) for name in _ARRAYS}
                shapes = fh.get_tensor("source_shapes").numpy() if "source_shapes" in fh.keys() else None  # noqa: SIM118
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
            if shapes is not None and (shapes.shape != (num_source, 2) or (shapes < 1).any()):
                raise ValueError(f"source_shapes of shape {shapes.shape} for {num_source} slices")
            if meta["plane"] not in (None, *GEOMETRIC_PLANES):
                raise ValueError(f"plane {meta['plane']!r}")
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
                source_shapes=shapes,
                plane=meta["plane"],
            )
        except Exception as err:  # safetensors raises its own error types; any failure means "rebuild"
            self.corrupt += 1
            warnings.warn(
                f"corrupt cache entry {path} ({type(err).__name__}: {err}); rebuilding it", stacklevel=3
            )
            return None
