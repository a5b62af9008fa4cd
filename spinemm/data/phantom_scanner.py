"""The real RSNA set's scanner variety, for ``make_phantom(variety="kaggle")``.

The plain phantom scans every series of a dataset on one square matrix. Real lumbar studies come
from many scanners, and a pipeline that works in millimetres must not care which (DESIGN §4):

- **Matrix.** Each series is stored on its own matrix, drawn from the sizes scanners write (256 to
  1024 px), about 15% of them not square, with square pixels sized so that the field of view stays
  anatomically right (across the shorter side: a rectangular matrix adds field, never cuts anatomy).
- **Acquisition.** A scanner acquires a coarser matrix than it stores (0.55-1.1 mm pixels) and
  interpolates it up by zero-filling k-space. The phantom renders at the acquired matrix, adds
  complex Gaussian noise there, zero-fills to the stored matrix and takes the magnitude (Rician
  noise, spatially correlated as in real reconstructions). Noise per acquired pixel grows as its
  area shrinks (signal per voxel falls with its size, DESIGN §4's "what the images hold"): one
  noise level in millimetres, whatever the matrix.
- **Vendor.** 12- or 16-bit stored values, a rescale slope and intercept on some series,
  MONOCHROME1 on a few, and a share of JPEG 2000 lossless, JPEG-LS lossless and RLE lossless files
  where pydicom has an encoder for them (the ``dicom`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

__all__ = ["Scanner", "draw_scanner", "reconstruct", "available_syntaxes", "MATRIX_SIZES"]

#: Stored matrix sizes (columns) and how often each is drawn: 512 and 384 are the commonest.
MATRIX_SIZES = (256, 320, 384, 448, 512, 640, 768, 1024)
_MATRIX_WEIGHTS = np.array([0.10, 0.13, 0.20, 0.10, 0.27, 0.10, 0.06, 0.04])
NON_SQUARE_RATE = 0.15
_ASPECTS = (0.75, 0.8, 0.875)  # rows / columns of a non-square matrix (or its inverse)
#: Acquired pixel size, mm: what the scanner resolves before it interpolates to the stored matrix.
ACQUIRED_MM = (0.55, 1.1)
#: The pixel size at which the plain phantom's noise level is defined (its typical 96 px pixel).
REFERENCE_MM = 2.0
TWELVE_BIT_RATE = 0.5
MONOCHROME1_RATE = 0.06
RESCALE_RATE = 0.5
#: Share of series written compressed; each compressed series takes one of COMPRESSED_SYNTAXES.
COMPRESSED_RATE = 0.2
COMPRESSED_SYNTAXES = (JPEG2000Lossless, JPEGLSLossless, RLELossless)


@dataclass(frozen=True)
class Scanner:
    """How one series is stored: its matrix, the matrix it was acquired on, and its encoding."""

    rows: int
    columns: int
    acquired: tuple[int, int]  # (rows, columns) rendered before zero-filling to (rows, columns)
    bits_stored: int  # 12 or 16 (BitsAllocated is always 16)
    monochrome1: bool
    rescaled: bool  # a RescaleSlope / RescaleIntercept other than (1, 0)
    transfer_syntax: str  # the UID each file is written with (explicit VR little endian if none)

    @property
    def max_stored(self) -> int:
        return (1 << self.bits_stored) - 1


def available_syntaxes() -> tuple[str, ...]:
    """The compressed transfer syntaxes pydicom can encode here (and so a reader can decode)."""
    from pydicom.pixels.encoders.base import get_encoder  # heavy import, only for a variety phantom

    return tuple(uid for uid in COMPRESSED_SYNTAXES if get_encoder(uid).is_available)


def _even(n: float) -> int:
    return max(16, int(round(n / 16.0)) * 16)


def draw_scanner(rng: np.random.Generator, fov_mm: float, syntaxes: tuple[str, ...]) -> tuple[Scanner, float]:
    """One series' scanner for a field of view ``fov_mm`` across its shorter side: a non-square
    matrix shows more on its longer side, never less, so every labelled point a square one would
    show stays inside the image (as every RSNA label does).

    Returns the scanner and the stored pixel spacing (mm, square pixels, as DICOM stores it)."""
    columns = int(rng.choice(MATRIX_SIZES, p=_MATRIX_WEIGHTS / _MATRIX_WEIGHTS.sum()))
    rows = columns
    if rng.random() < NON_SQUARE_RATE:
        aspect = float(rng.choice(_ASPECTS))
        rows = _even(columns * aspect) if rng.random() < 0.5 else _even(columns / aspect)
    spacing = round(fov_mm / min(rows, columns), 6)
    acquired_mm = rng.uniform(*ACQUIRED_MM)
    # never acquire finer than stored: a scanner interpolates up, not down
    acquired = (min(rows, _even(rows * spacing / acquired_mm)), min(columns, _even(columns * spacing / acquired_mm)))
    bits = 12 if rng.random() < TWELVE_BIT_RATE else 16
    monochrome1 = bool(rng.random() < MONOCHROME1_RATE)
    rescaled = bool(rng.random() < RESCALE_RATE)
    compressed = rng.random() < COMPRESSED_RATE
    pick = int(rng.integers(len(COMPRESSED_SYNTAXES)))  # drawn always, so the stream never depends on plugins
    syntax = COMPRESSED_SYNTAXES[pick] if compressed and COMPRESSED_SYNTAXES[pick] in syntaxes else ExplicitVRLittleEndian
    return Scanner(rows, columns, acquired, bits, monochrome1, rescaled, str(syntax)), spacing


def noise_scale(spacing_mm: tuple[float, float]) -> float:
    """Factor on the plain phantom's per-pixel noise for pixels of ``spacing_mm`` (row, column):
    the noise a :data:`REFERENCE_MM` pixel averages down to stays the same in millimetres."""
    return REFERENCE_MM / float(np.sqrt(spacing_mm[0] * spacing_mm[1]))


def reconstruct(acquired: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Zero-fill the complex ``[S, r, c]`` image's k-space to ``[S, rows, columns]``, as scanners
    interpolate to their stored matrix; returns the magnitude, float32. Pixel (0, 0) keeps its
    place: output pixel j lies at input pixel ``j * r / rows``."""
    depth, r, c = acquired.shape
    if (r, c) == (rows, columns):
        return np.abs(acquired).astype(np.float32)
    spectrum = np.fft.fftshift(np.fft.fft2(acquired), axes=(-2, -1))
    padded = np.zeros((depth, rows, columns), dtype=np.complex64)
    top, left = (rows - r + 1) // 2, (columns - c + 1) // 2  # the DC bin lands on the output's DC bin
    padded[:, top:top + r, left:left + c] = spectrum
    image = np.fft.ifft2(np.fft.ifftshift(padded, axes=(-2, -1))) * (rows * columns / (r * c))
    return np.abs(image).astype(np.float32)


def encode(physical: np.ndarray, scanner: Scanner, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """Physical intensities ``[S, H, W]`` stored as the scanner writes them: ``(stored uint16,
    RescaleSlope, RescaleIntercept)``, with ``physical = stored * slope + intercept`` for
    MONOCHROME2 (MONOCHROME1 stores ``max_stored - stored``)."""
    if scanner.rescaled:  # a slope of 1 or more: a 12-bit series keeps its bright fat under 4095
        slope, intercept = round(rng.uniform(1.0, 3.0), 6), round(rng.uniform(-20.0, 0.0), 3)
    else:
        slope, intercept = 1.0, 0.0
    # a 16-bit scanner uses more of its range, a 12-bit one stays under 4095
    gain = 1.0 if scanner.bits_stored == 12 else float(rng.uniform(2.0, 12.0))
    stored = np.clip(np.rint((physical * gain - intercept) / slope), 0, scanner.max_stored).astype(np.uint16)
    if scanner.monochrome1:
        stored = (scanner.max_stored - stored).astype(np.uint16)
    return stored, slope, intercept
