"""A series' decoded slices -> one volume: physical intensities (float32), or windowed to [0, 1]
(float16) in the same pass.

:func:`~spinemm.data.dicom.read_series` parses each file into a slice record (its stored pixels,
often a read-only view on the file's bytes, and the tags that scale them: RescaleSlope / Intercept
or a ModalityLUTSequence, MONOCHROME1 mirroring). This module turns those records into the volume:

* :func:`physical_volume`: float32 ``[S, H, W]`` physical intensities, for callers that want them;
* :func:`unit_volume`: what every pipeline stage reads (:class:`~spinemm.data.store.SeriesStore`):
  the series windowed by its own 0.5/99.5 percentiles to [0, 1] as float16, made a slice at a time
  through a float32 buffer the size of one slice, so no float32 volume is ever built. At 512 px
  that volume is 50 MB per series, written once and read back once by the two-step path
  (``windowed(read_series(...))``); the values are bit-identical to that path (tested).

Slices whose size differs from the series' most common size are resampled to it (bilinear, same
field of view), with a warning naming the files.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.pixels import apply_modality_lut

from .transforms import (
    INTENSITY_PERCENTILES,
    interpolate_ranks,
    percentile_ranks,
    percentile_stride,
    sample_percentiles,
    unit_slice_,
    window_scale,
)

__all__ = ["physical_volume", "unit_volume"]


def common_shape(slices: Sequence[Any], series_dir: Path) -> tuple[int, int]:
    """The most common slice shape; the others are named in a warning (they are resampled to it)."""
    shape = Counter(s.pixels.shape for s in slices).most_common(1)[0][0]
    odd = [s.path.name for s in slices if s.pixels.shape != shape]
    if odd:
        warnings.warn(
            f"{series_dir}: slices {odd} differ from the common size {shape}; resampled to it (bilinear)",
            stacklevel=4,
        )
    return shape


def physical_slice(s: Any, shape: tuple[int, int], out: np.ndarray, step: int = 1) -> None:
    """Write slice ``s``'s physical intensities into float32 ``out``; ``step > 1``: only every
    ``step``-th row and column (``out`` is that small), for a slice that needs no resampling and no
    LUT table (the same values as the full slice's strided view)."""
    if step > 1:
        raw = s.pixels[::step, ::step]
    else:
        raw = s.pixels if s.lut_dataset is None else apply_modality_lut(s.pixels, s.lut_dataset)
        if raw.shape != shape:
            raw = _resize_bilinear(raw.astype(np.float32), shape)
    out[...] = raw  # the one unavoidable pass: cast to float32 in place
    _rescale_(out, s)


def _rescale_(out: np.ndarray, s: Any) -> None:
    """Stored values (float32, in place) -> physical intensities, for a slice without a LUT table."""
    if s.lut_dataset is None and s.slope != 1.0:
        out *= np.float32(s.slope)
    if s.lut_dataset is None and s.intercept != 0.0:
        out += np.float32(s.intercept)
    if s.mirror is not None:  # MONOCHROME1: low stored values mean bright
        np.subtract(np.float32(s.mirror), out, out=out)


def physical_volume(slices: Sequence[Any], series_dir: Path) -> np.ndarray:
    """float32 ``[S, H, W]`` physical intensities, allocated once and written slice by slice."""
    shape = common_shape(slices, series_dir)
    volume = np.empty((len(slices), *shape), dtype=np.float32)
    for i, s in enumerate(slices):
        physical_slice(s, shape, volume[i])
    return volume


def unit_volume(slices: Sequence[Any], series_dir: Path) -> np.ndarray:
    """float16 ``[S, H, W]`` in [0, 1]: physical intensities windowed by the series' own
    percentiles (:func:`~spinemm.data.transforms.intensity_window`'s sampling grid), one slice at
    a time (module docstring)."""
    shape = common_shape(slices, series_dir)
    step = percentile_stride((len(slices), *shape))
    work = np.empty(shape, dtype=np.float32)
    # pass 1: the window, from the percentile grid's samples
    window = _window_from_stored(slices, shape, step) or _window_from_physical(slices, shape, step, work)
    low, scale = window_scale(window)
    out = torch.empty((len(slices), *shape), dtype=torch.float16)
    buffer = torch.from_numpy(work)
    for i, s in enumerate(slices):  # pass 2: each slice through the slice-sized float32 buffer
        physical_slice(s, shape, work)
        unit_slice_(buffer, low, scale, buffer, out[i])
    return out.numpy()


def _window_from_physical(slices: Sequence[Any], shape: tuple[int, int], step: int,
                          work: np.ndarray) -> tuple[float, float]:
    """The window from the sampled physical intensities, strided views where possible."""
    grid = (len(range(0, shape[0], step)), len(range(0, shape[1], step)))
    samples = np.empty((len(slices), *grid), dtype=np.float32)
    for i, s in enumerate(slices):
        if s.lut_dataset is None and s.pixels.shape == shape:
            physical_slice(s, shape, samples[i], step)
        else:
            physical_slice(s, shape, work)
            samples[i] = work[::step, ::step]
    low, high = sample_percentiles(samples, INTENSITY_PERCENTILES)
    return low, high


def _window_from_stored(slices: Sequence[Any], shape: tuple[int, int], step: int) -> tuple[float, float] | None:
    """The same window as :func:`_window_from_physical`, read off a histogram of the sampled stored
    integers: ~10x cheaper than partially sorting 2^18 floats. The rescale is one monotone float32
    map for the whole series, so each order statistic of the physical sample is the map of one of the
    stored sample's, and :func:`~spinemm.data.transforms.interpolate_ranks` interpolates them as
    the float path does. None (use the float path) for a LUT table, odd slices, rescales that
    differ between slices, or values wider than 16 bits."""
    first = slices[0]
    rescale, dtype = (first.slope, first.intercept, first.mirror), first.pixels.dtype
    if dtype.kind not in "iu" or dtype.itemsize > 2 or any(
            s.lut_dataset is not None or s.pixels.shape != shape or s.pixels.dtype != dtype
            or (s.slope, s.intercept, s.mirror) != rescale for s in slices):
        return None
    stored = np.concatenate([s.pixels[::step, ::step].reshape(-1) for s in slices])
    offset = 0
    if dtype.kind == "i":  # flip the sign bit: the unsigned order of the bits is then the signed order
        unsigned = np.dtype(f"u{dtype.itemsize}")
        offset = -(1 << (8 * dtype.itemsize - 1))
        stored = stored.view(unsigned) ^ np.array(-offset, dtype=unsigned)
    cumulative = np.cumsum(np.bincount(stored))  # ~0.5 ms a 512 px series (8x less than on a shifted int32 copy)
    n = int(cumulative[-1])
    below, above, weight = percentile_ranks(n, INTENSITY_PERCENTILES)
    decreasing = (first.slope < 0) != (first.mirror is not None)
    if decreasing:  # the k-th smallest physical value is the map of the k-th largest stored one
        below, above = n - 1 - below, n - 1 - above
    ranks = np.concatenate([below, above])
    values = (np.searchsorted(cumulative, ranks, side="right") + offset).astype(np.float32)
    _rescale_(values, first)
    half = len(below)
    return interpolate_ranks(values[:half], values[half:], weight)


def _resize_bilinear(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample [h, w] -> ``shape`` over the same field of view (pixel centres aligned, edges clamped)."""
    out_h, out_w = shape
    in_h, in_w = image.shape
    ys = np.clip((np.arange(out_h) + 0.5) * in_h / out_h - 0.5, 0, in_h - 1)
    xs = np.clip((np.arange(out_w) + 0.5) * in_w / out_w - 0.5, 0, in_w - 1)
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)  # floor: coordinates are >= 0
    y1, x1 = np.minimum(y0 + 1, in_h - 1), np.minimum(x0 + 1, in_w - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx
    bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)
