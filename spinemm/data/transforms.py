"""Series -> model-ready slice stacks, and train-time augmentations that keep location targets true.

Two halves:

* :func:`preprocess_series` is deterministic (so :class:`~spinemm.data.cache.SeriesCache` can store
  its result): choose ``S`` slices evenly over the geometric order, normalise intensities per series,
  build the 3 channels of each slice (2.5D neighbours or the slice replicated) and resize in-plane.
* :func:`augment_plane` is random (driven only by a ``torch.Generator``) and acts on the stored
  ``[S, C, H, W]`` tensor: affine shift/scale, intensity gain/gamma/noise and a slice shift. Every
  geometric change is applied to the location targets too.

Location convention (CONTRACTS "Sample format"): ``x, y`` are normalised by the ORIGINAL width and
height, so one normalised point means the same anatomy at any resize; the resize is a plain stretch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the attributes we use are listed in CONTRACTS (dicom.py)
    from .series import Series

CHANNEL_MODES = ("2.5d", "single")
#: Percentiles mapped to 0 and 1 by the per-series normalisation (robust to hot pixels).
INTENSITY_PERCENTILES = (0.5, 99.5)


@dataclass
class PreprocessedSeries:
    """The deterministic, cacheable result of preprocessing one series.

    ``image`` is float16 in [0, 1] whether or not it came from the cache, so cached and uncached
    pipelines feed the model bit-identical inputs.
    """

    image: torch.Tensor  # float16 [S, C, H, W]
    indices: np.ndarray  # int64 [S]: position in the sorted (geometric) stack of each resampled slice
    instance_numbers: np.ndarray  # int64 [S]: InstanceNumber shown at each resampled slice
    source_instance_numbers: np.ndarray  # int64 [N]: InstanceNumber of every sorted slice
    original_shape: tuple[int, int]  # (H, W) of the DICOM images
    pixel_spacing: tuple[float, float]  # (row_mm, col_mm)
    slice_spacing: float  # mm between neighbouring sorted slices
    # int64 [N, 2]: each sorted slice's own (rows, columns) when some slice was resampled to
    # ``original_shape`` (``Series.source_shapes``); None when all have that size
    source_shapes: np.ndarray | None = None
    plane: str | None = None  # "sagittal" / "coronal" / "axial" from ImageOrientationPatient (Series.plane)

    @property
    def num_source_slices(self) -> int:
        return int(self.source_instance_numbers.shape[0])

    def index_of_instance(self, instance_number: int) -> int | None:
        """Sorted-stack index of an InstanceNumber, or None when the series has no such slice."""
        hits = np.flatnonzero(self.source_instance_numbers == int(instance_number))
        return int(hits[0]) if hits.size else None


def choose_slices(num_source: int, num_slices: int) -> np.ndarray:
    """``num_slices`` sorted-stack indices spread evenly over ``[0, num_source)`` (nearest slice).

    With fewer source slices than requested, slices repeat (e.g. 3 -> 6 gives ``[0,0,1,1,2,2]``).
    """
    if num_source < 1 or num_slices < 1:
        raise ValueError(f"need >= 1 source and target slice, got {num_source} and {num_slices}")
    positions = np.linspace(0.0, num_source - 1, num_slices)
    # floor(x + 0.5) rather than np.rint: round-half-to-even would make the spacing uneven
    return np.floor(positions + 0.5).astype(np.int64)


#: Percentiles are estimated on a regular grid of at least this many pixels: on a 50-slice 512 px
#: series every 4th row and column (820k of 13M pixels) moves the 0.5/99.5 percentiles by ~0.1% of
#: the window and costs 1/16 of the 0.1 s the full sort takes (benchmarks/predict_throughput.py).
PERCENTILE_SAMPLES = 1 << 18


def percentile_stride(shape: tuple[int, ...]) -> int:
    """Every how many rows and columns :func:`intensity_window` samples a volume of ``shape``."""
    return max(1, int(math.sqrt(math.prod(shape) / PERCENTILE_SAMPLES)))


def percentile_ranks(n: int, percentiles: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``n`` sorted values: the ranks below and above each percentile and the weight of the
    upper one (numpy's default "linear" method: position ``p / 100 * (n - 1)``)."""
    position = np.asarray(percentiles, dtype=np.float64) / 100.0 * (n - 1)
    below = np.floor(position).astype(np.int64)
    return below, np.minimum(below + 1, n - 1), position - below


def interpolate_ranks(below: np.ndarray, above: np.ndarray, weight: np.ndarray) -> tuple[float, ...]:
    """The values at the ranks of :func:`percentile_ranks`, interpolated (float64)."""
    below, above = np.asarray(below, dtype=np.float64), np.asarray(above, dtype=np.float64)
    return tuple(float(v) for v in below + (above - below) * weight)


def sample_percentiles(sample: np.ndarray, percentiles: Sequence[float] = INTENSITY_PERCENTILES) -> tuple[float, ...]:
    """Percentiles of ``sample`` as ``np.percentile`` defines them (to float rounding), from one
    partial sort. :func:`~spinemm.data.pixels.unit_volume` reads the same order statistics off a
    histogram of the stored integers and interpolates them with the same code, so both paths give
    the same window to the bit."""
    flat = np.asarray(sample).reshape(-1)
    if flat.size == 0:
        raise ValueError("cannot take percentiles of an empty sample")
    below, above, weight = percentile_ranks(flat.size, percentiles)
    ordered = np.partition(flat, np.unique(np.concatenate([below, above])))
    return interpolate_ranks(ordered[below], ordered[above], weight)


def intensity_window(
    volume: np.ndarray, percentiles: tuple[float, float] = INTENSITY_PERCENTILES
) -> tuple[float, float]:
    """The ``(low, high)`` intensities that map to 0 and 1 for this series (physical units), from
    every ``stride``-th row and column of each slice (``PERCENTILE_SAMPLES``)."""
    volume = np.asarray(volume)
    if volume.ndim >= 2:
        stride = percentile_stride(volume.shape)
        volume = volume[..., ::stride, ::stride]
    low, high = sample_percentiles(volume, percentiles)
    return low, high


def window_scale(window: tuple[float, float]) -> tuple[float, float]:
    """``(low, scale)`` with ``(x - low) * scale`` mapping the window to [0, 1]; a constant series
    (``high <= low``) gets scale 0 (all zeros)."""
    low, high = window
    return low, (1.0 / (high - low) if high > low else 0.0)


def to_unit_range(slices: np.ndarray, window: tuple[float, float]) -> torch.Tensor:
    """float32 tensor of ``slices`` with ``window = (low, high)`` mapped to [0, 1], clipped; a
    constant series (``high <= low``) becomes all zeros."""
    low, scale = window_scale(window)
    return torch.from_numpy((np.asarray(slices, dtype=np.float32) - low) * scale).clamp_(0.0, 1.0)


def unit_slice_(source: torch.Tensor, low: float, scale: float, work: torch.Tensor, out: torch.Tensor) -> None:
    """One float32 slice windowed into ``out`` (float16) through ``work`` (float32, may be ``source``)."""
    torch.sub(source, low, out=work).mul_(scale).clamp_(0.0, 1.0)
    out.copy_(work)


def to_unit_float16(volume: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """:func:`to_unit_range` as float16, one slice at a time: the float32 temporaries stay the size
    of a slice (in the CPU's cache), 2x faster on a 512 px series than whole-volume passes."""
    low, scale = window_scale(window)
    source = torch.from_numpy(np.asarray(volume, dtype=np.float32))
    out = torch.empty(source.shape, dtype=torch.float16)
    work = torch.empty(source.shape[1:], dtype=torch.float32)
    for index in range(source.shape[0]):
        unit_slice_(source[index], low, scale, work, out[index])
    return out.numpy()


def resize_slices(slices: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of ``[N, H, W]`` to ``[N, image_size, image_size]`` (float32)."""
    out = F.interpolate(
        slices[:, None].float(),
        size=(image_size, image_size),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    return out[:, 0].clamp_(0.0, 1.0)


def channel_indices(indices: np.ndarray, num_source: int, channels: str) -> np.ndarray:
    """``[S, 3]`` sorted-stack indices feeding the 3 channels of each chosen slice.

    ``"2.5d"``: ``(i-1, i, i+1)`` from the original stack, clamped at the ends (so the first slice
    repeats itself); ``"single"``: ``(i, i, i)``.
    """
    if channels == "2.5d":
        return np.clip(indices[:, None] + np.arange(-1, 2)[None, :], 0, num_source - 1)
    if channels == "single":
        return np.repeat(indices[:, None], 3, axis=1)
    raise ValueError(f"channels must be one of {CHANNEL_MODES}, got {channels!r}")


def preprocess_series(
    series: Series, num_slices: int, image_size: int, channels: str = "2.5d"
) -> PreprocessedSeries:
    """Resample, normalise, stack channels and resize one series (the deterministic pipeline).

    ``series.volume`` holds physical intensities in geometric order (``read_series``); the
    0.5/99.5 percentiles of the series (:func:`intensity_window`) map to [0, 1], then values are clipped.
    """
    volume = series.volume  # [N, H, W]
    num_source = int(volume.shape[0])
    indices = choose_slices(num_source, num_slices)
    feeds = channel_indices(indices, num_source, channels)  # [S, 3]
    # normalise and resize each needed source slice once, then gather the channels
    needed, inverse = np.unique(feeds, return_inverse=True)
    if getattr(series, "windowed", False):  # a SeriesStore series is already float16 in [0, 1]
        # each needed slice converted straight into its row: one pass, not a gather and then a cast
        source = torch.from_numpy(np.asarray(volume))
        normed = torch.empty((len(needed), *volume.shape[1:]), dtype=torch.float32)
        for row, index in enumerate(needed.tolist()):
            normed[row].copy_(source[index])
    else:
        normed = to_unit_range(volume[needed], intensity_window(volume))
    resized = resize_slices(normed, image_size)  # [U, size, size]
    image = resized[torch.from_numpy(inverse.reshape(feeds.shape))]  # [S, 3, size, size]
    source_instances = np.asarray(series.instance_numbers, dtype=np.int64)
    return PreprocessedSeries(
        image=image.to(torch.float16).contiguous(),
        indices=indices,
        instance_numbers=source_instances[indices],
        source_instance_numbers=source_instances,
        original_shape=(int(volume.shape[1]), int(volume.shape[2])),
        pixel_spacing=(float(series.pixel_spacing[0]), float(series.pixel_spacing[1])),
        slice_spacing=float(series.slice_spacing),
        source_shapes=getattr(series, "source_shapes", None),
        plane=getattr(series, "plane", None),
    )


def nearest_slice(indices: np.ndarray, source_index: int, num_source: int) -> int | None:
    """Resampled slice showing (or nearest to) sorted-stack slice ``source_index``; first on ties.

    Returns None when the slice is farther from every shown slice than :func:`choose_slices` ever
    leaves it (0 when every source slice is shown, else half a step plus rounding), which only
    happens after :func:`shift_stack` moved the labelled slice out of the stack.
    """
    distance = np.abs(np.asarray(indices) - source_index)
    best = int(np.argmin(distance))
    step = (num_source - 1) / max(len(indices) - 1, 1)
    tolerance = 0.0 if step <= 1.0 else step / 2 + 0.5
    return best if distance[best] <= tolerance else None


def slice_position(indices: np.ndarray, source_index: int, num_source: int) -> float | None:
    """Where sorted-stack slice ``source_index`` lies in the resampled stack, as a float: its own
    position when it is shown, else linear between the shown slices on either side (a stack of 8
    drawn from 15 shows source 6 and 8 at 3 and 4, so source 7, the midline of an odd stack, is 3.5).

    The first stage's slice target. :func:`nearest_slice` rounds it to a shown slice ("first on
    ties"), which made the midline of every odd stack unreachable: trained to say 3, the stage
    answered source 6 for a label on 7. None where :func:`nearest_slice` is None."""
    nearest = nearest_slice(indices, source_index, num_source)
    if nearest is None:
        return None
    shown = np.asarray(indices)
    exact = np.flatnonzero(shown == source_index)
    if exact.size:
        return float(exact[0])
    above = int(np.searchsorted(shown, source_index))  # the first shown slice past it
    if above == 0 or above == len(shown) or shown[above] <= shown[above - 1]:
        return float(nearest)  # beyond the stack's ends (a shifted stack): the nearest shown slice
    low, high = float(shown[above - 1]), float(shown[above])
    return (above - 1) + (source_index - low) / (high - low)


def source_slice(indices: np.ndarray, position: float) -> int:
    """The sorted-stack slice at a (fractional) resampled ``position``: the inverse of
    :func:`slice_position`, rounded to the nearest source slice."""
    shown = np.asarray(indices, dtype=np.float64)
    source = np.interp(float(position), np.arange(len(shown)), shown)
    return int(round(source))


@dataclass
class AugmentConfig:
    """Ranges of the train-time augmentations; set a range to its identity to switch one off."""

    max_shift: float = 0.08  # fraction of the image size, per axis
    scale: tuple[float, float] = (0.9, 1.1)  # zoom factor, drawn log-uniformly
    gain: tuple[float, float] = (0.85, 1.15)
    gamma: tuple[float, float] = (0.8, 1.25)  # drawn log-uniformly
    noise_std: float = 0.02  # Gaussian noise on [0, 1] intensities
    slice_shift: int = 1  # the stack moves by an integer in [-slice_shift, slice_shift]


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _log_uniform(low: float, high: float, generator: torch.Generator) -> float:
    return math.exp(_uniform(math.log(low), math.log(high), generator))


def affine(
    image: torch.Tensor, points: torch.Tensor, valid: torch.Tensor, scale: float, shift: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zoom by ``scale`` about the centre, then move by ``shift`` (fractions of width, height).

    image ``[S, C, H, W]``; points ``[K, 2]`` normalised ``(x, y)``; valid ``[K]`` bool. A point
    that leaves the image becomes invalid (and zero). In grid_sample's [-1, 1] coordinates a point
    ``g`` moves to ``scale * g + 2 * shift``, so the sampling grid is the inverse map.
    """
    dx, dy = 2.0 * shift[0], 2.0 * shift[1]
    theta = torch.tensor(
        [[1.0 / scale, 0.0, -dx / scale], [0.0, 1.0 / scale, -dy / scale]], dtype=torch.float32
    )
    # one grid serves every slice and channel: the stack goes through as the channels of one image
    # (the same arithmetic per channel as a grid per slice, without building S identical grids)
    height, width = image.shape[-2:]
    grid = F.affine_grid(theta[None], [1, 1, height, width], align_corners=False)
    flat = image.float().reshape(1, -1, height, width)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(image.shape)
    moved = ((scale * (points * 2.0 - 1.0) + torch.tensor([dx, dy])) + 1.0) / 2.0
    inside = ((moved >= 0.0) & (moved < 1.0)).all(dim=1)
    keep = valid & inside
    return out, torch.where(keep[:, None], moved, torch.zeros_like(moved)), keep


def adjust_intensity(
    image: torch.Tensor, gain: float, gamma: float, noise_std: float, generator: torch.Generator
) -> torch.Tensor:
    """``clip(gain * image**gamma + N(0, noise_std))`` on a [0, 1] tensor; geometry unchanged."""
    out = image.float().clamp(0.0, 1.0).pow(gamma).mul_(gain)
    if noise_std > 0:
        out.add_(torch.randn(out.shape, generator=generator).mul_(noise_std))
    return out.clamp_(0.0, 1.0)


def shift_stack(
    image: torch.Tensor, indices: np.ndarray, instance_numbers: np.ndarray, offset: int
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Move the resampled stack by ``offset`` slices: new slice ``s`` shows old slice ``s + offset``.

    Clamped at the ends; the index arrays move with the pixels, so slice targets recomputed with
    :func:`nearest_slice` from the new ``indices`` stay on the labelled anatomy.
    """
    take = np.clip(np.arange(len(indices)) + offset, 0, len(indices) - 1)
    return image[torch.from_numpy(take)], indices[take], instance_numbers[take]


def augment_plane(
    image: torch.Tensor,
    indices: np.ndarray,
    instance_numbers: np.ndarray,
    points: torch.Tensor,
    valid: torch.Tensor,
    generator: torch.Generator,
    config: AugmentConfig | None = None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """Random slice shift, affine and intensity change of one plane's stack and its targets.

    image float ``[S, C, H, W]``; points ``[K, 2]`` normalised (x, y) of this plane's targets; valid
    ``[K]``. Returns ``(image float32, indices, instance_numbers, points, valid)``. Everything random
    comes from ``generator``, so a seeded generator reproduces the same augmentation.
    """
    cfg = config or AugmentConfig()
    offset = int(torch.randint(-cfg.slice_shift, cfg.slice_shift + 1, (), generator=generator))
    image, indices, instance_numbers = shift_stack(image, indices, instance_numbers, offset)
    scale = _log_uniform(*cfg.scale, generator)
    shift = (
        _uniform(-cfg.max_shift, cfg.max_shift, generator),
        _uniform(-cfg.max_shift, cfg.max_shift, generator),
    )
    image, points, valid = affine(image, points, valid, scale, shift)
    gain, gamma = _uniform(*cfg.gain, generator), _log_uniform(*cfg.gamma, generator)
    image = adjust_intensity(image, gain, gamma, cfg.noise_std, generator)
    return image, indices, instance_numbers, points, valid
