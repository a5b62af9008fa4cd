"""Helpers shared by the baseline slice encoders (:mod:`.baselines`, :mod:`.unet3d`).

Kept in its own module so the dependency points one way: ``baselines`` imports ``unet3d``,
both import this module, and neither ``unet3d`` nor this module imports ``baselines``.
"""

from __future__ import annotations

import torch

from ..errors import SpineModelError


def check_series(series: torch.Tensor, in_chans: int, image_size: int, name: str) -> tuple[int, int]:
    """Validate a [N, S, C, H, W] batch against an encoder's fixed channels and size; return (N, S).

    The token grid (and so the location head) is fixed at build time, so other sizes are an error.
    """
    if series.ndim != 5:
        raise SpineModelError(f"{name}: expected series [N, S, C, H, W], got shape {tuple(series.shape)}")
    n, s, c, h, w = series.shape
    if c != in_chans or h != image_size or w != image_size:
        raise SpineModelError(
            f"{name}: expected [N, S, {in_chans}, {image_size}, {image_size}], got {tuple(series.shape)}"
        )
    return n, s
