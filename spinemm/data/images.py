"""Single images as a dual encoder reads them: ``[N, 3, size, size]`` in [0, 1].

:func:`load_images` takes what open_clip's transforms take and what a radiologist has at hand: a
tensor or array ``[N, C, H, W]`` / ``[N, H, W]``, a list of ``[H, W]`` / ``[C, H, W]`` arrays, PIL
images, or DICOM file paths (read by :func:`~spinemm.data.dicom.read_slice`, with every check of
the series reader). Raw intensities are windowed to the dataset's percentiles
(``INTENSITY_PERCENTILES``), grey is repeated into three channels and the image resized.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SpineDataError, SpineModelError
from .dicom import read_slice
from .transforms import INTENSITY_PERCENTILES

__all__ = ["load_images", "NORMALIZE_MODES"]

NORMALIZE_MODES = ("auto", "percentile", "none")


def load_images(images: Any, image_size: int, normalize: str = "auto") -> torch.Tensor:
    """Any supported image input -> float32 [N, 3, image_size, image_size] in [0, 1]."""
    if normalize not in NORMALIZE_MODES:
        raise SpineModelError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if isinstance(images, (str, os.PathLike)) or _is_pil(images):
        images = [images]
    if isinstance(images, (torch.Tensor, np.ndarray)):
        batch = torch.as_tensor(
            np.asarray(images, dtype=np.float32) if isinstance(images, np.ndarray) else images
        )
        batch = batch.float()
        if batch.ndim == 3:
            batch = batch[:, None]
        if batch.ndim != 4:
            raise SpineDataError(f"images must be [N, C, H, W] or [N, H, W], got shape {tuple(batch.shape)}")
        items = list(batch)
    else:
        items = [
            _read_dicom(Path(x)) if isinstance(x, (str, os.PathLike)) else _pil_pixels(x) if _is_pil(x)
            else torch.as_tensor(np.asarray(x), dtype=torch.float32)
            for x in images
        ]
        items = [x[None] if x.ndim == 2 else x for x in items]  # [H, W] -> [1, H, W]
    if not items:
        raise SpineDataError("no images given")
    return torch.stack([_prepare(img, image_size, normalize) for img in items])


def _prepare(image: torch.Tensor, image_size: int, normalize: str) -> torch.Tensor:
    """[C, H, W] (C = 1 or 3) -> [3, image_size, image_size] in [0, 1]."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise SpineDataError(
            f"each image must be [H, W], [1, H, W] or [3, H, W], got shape {tuple(image.shape)}"
        )
    image = image.float()
    outside = bool(image.min() < 0 or image.max() > 1)
    if normalize == "percentile" or (normalize == "auto" and outside):
        low, high = np.percentile(image.numpy(), INTENSITY_PERCENTILES)  # the dataset's intensity window
        image = ((image - low) / max(high - low, 1e-6)).clamp(0, 1)
    elif outside:
        raise SpineDataError("normalize='none' needs images in [0, 1]")
    image = image.expand(3, -1, -1)
    if image.shape[-2:] != (image_size, image_size):
        image = F.interpolate(
            image[None], size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )[0].clamp(0, 1)
    return image


def _read_dicom(path: Path) -> torch.Tensor:
    """One greyscale DICOM slice -> [H, W] float32 physical intensities (the data layer's reader:
    modality LUT applied, MONOCHROME1 mirrored)."""
    return torch.from_numpy(read_slice(path)[0])


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.")


def _pil_pixels(image: Any) -> torch.Tensor:
    """A PIL image as ``[H, W]`` float32 intensities: greyscale modes as they are (16-bit kept),
    colour ones converted to grey."""
    if image.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
        image = image.convert("L")
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
