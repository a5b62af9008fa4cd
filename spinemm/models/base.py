"""The one interface every vision backbone implements, so the paper's comparison is apples to apples."""

from __future__ import annotations

import torch
from torch import nn


class SliceEncoder(nn.Module):
    """Turns a stack of slices into tokens.

    Subclasses set ``width`` (token dim) and ``grid_size`` (h, w of the patch-token grid) and
    implement :meth:`forward`. 2D backbones fold slices into the batch; volumetric ones (the 3D
    U-Net) see the whole stack at once. Inputs are in [0, 1]; each encoder applies its own
    mean/std normalisation (``image_mean``/``image_std``) so callers never need to know it.
    """

    width: int
    grid_size: tuple[int, int]
    volumetric: bool = False  # True: reads the slices as depth (convolves across them), not one by one
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def forward(self, series: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """series [N, S, C, H, W] in [0, 1] -> (tokens [N, S, h*w, width], pooled [N, S, width])."""
        raise NotImplementedError

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Apply this encoder's mean/std along the channel dim (dim -3)."""
        mean = x.new_tensor(self.image_mean).view(-1, 1, 1)
        std = x.new_tensor(self.image_std).view(-1, 1, 1)
        return (x - mean) / std
