"""The level locator: where each disc level lies on a whole sagittal slice.

The fusion model finds every finding in low-resolution stacks; on the tiny preset one patch of its
grid spans about one disc, so it often puts two levels on the same disc or between two discs, and
the grader then grades the wrong level. The locator is a small fully convolutional net that reads
one sagittal slice (and its neighbours) at ``size`` pixels and draws one heatmap per disc level,
``size / 4`` cells a side, for the plane's conditions: the spinal canal on Sagittal T2/STIR, the
neural foramina on Sagittal T1. Its deepest stage sees the whole slice, so a level is told from its
neighbours by where it sits in the column of discs; the shallow stage it is merged with keeps the
position precise. Coordinate channels (x, y in [-1, 1]) let it use where on the slice it looks.

``spinemm.pipeline.LocateStage`` runs it; ``spinemm.training.locate`` trains it on the label points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import LEVELS, PLANES
from ..errors import SpineModelError
from .config import LocatorConfig
from .heads import decode_location

#: The planes the locator has heatmaps for: the sagittal ones (index into ``PLANES``).
LOCATOR_PLANES: tuple[int, ...] = (PLANES.index("Sagittal T1"), PLANES.index("Sagittal T2/STIR"))


def _stage(cin: int, cout: int) -> nn.Sequential:
    """Two conv3x3 -> BN -> ReLU, the first with stride 2."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class LevelLocator(nn.Module):
    """slices [N, 1 + 2 * context, size, size] in [0, 1] + plane [N] (a ``LOCATOR_PLANES`` entry)
    -> heatmap logits [N, 5 levels, size / 4, size / 4]."""

    def __init__(self, config: LocatorConfig) -> None:
        super().__init__()
        channels = tuple(config.channels)
        if len(channels) < 2:
            raise SpineModelError("locator.channels must list at least two conv stages")
        if config.size % 4:
            raise SpineModelError(f"locator.size must be a multiple of 4, got {config.size}")
        self.config = config
        in_chans = 1 + 2 * int(config.context) + 2  # the slices plus the x, y coordinate channels
        self.stages = nn.ModuleList(_stage(cin, cout) for cin, cout in zip((in_chans, *channels[:-1]), channels, strict=True))
        # Every stage after the second is projected to the second's width and added at its
        # resolution (size / 4): precise position from the shallow stage, level identity from the deep.
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels[1], 1) for c in channels[2:])
        self.head = nn.Sequential(nn.Conv2d(channels[1], channels[1], 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels[1], len(LOCATOR_PLANES) * len(LEVELS), 1))

    def forward(self, slices: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        expected = 1 + 2 * int(self.config.context)
        size = self.config.size
        if slices.ndim != 4 or slices.shape[1:] != (expected, size, size):
            raise SpineModelError(f"locator slices must be [N, {expected}, {size}, {size}], got {tuple(slices.shape)}")
        if not torch.compiler.is_compiling():  # a data-dependent check: eager mode only
            unknown = sorted(set(plane.tolist()) - set(LOCATOR_PLANES))
            if unknown:
                raise SpineModelError(f"the locator reads sagittal planes {LOCATOR_PLANES} (PLANES indices), "
                                      f"got {unknown}")
        # PLANES index -> this model's plane index, by a table lookup (no host sync; compiles)
        lookup = torch.zeros(max(LOCATOR_PLANES) + 1, dtype=torch.long, device=slices.device)
        lookup[list(LOCATOR_PLANES)] = torch.arange(len(LOCATOR_PLANES), device=slices.device)
        which = lookup[plane]
        n = slices.shape[0]
        axis = torch.linspace(-1, 1, size, device=slices.device, dtype=slices.dtype)
        coords = torch.stack(torch.meshgrid(axis, axis, indexing="ij")[::-1])  # (x, y) channels
        x = torch.cat([(slices - 0.5) / 0.5, coords.expand(n, 2, size, size)], dim=1)
        x = x.contiguous(memory_format=torch.channels_last)  # the CPU's conv kernels run faster on it
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        merged = features[1]
        for lateral, deep in zip(self.lateral, features[2:], strict=True):
            merged = merged + F.interpolate(lateral(deep), size=merged.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(merged).unflatten(1, (len(LOCATOR_PLANES), len(LEVELS)))  # [N, planes, 5, g, g]
        return logits[torch.arange(n, device=slices.device), which]


def decode_heatmaps(logits: torch.Tensor, radius: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmap logits [N, 5, g, g] -> ((x, y) in [0, 1] [N, 5, 2], confidence [N, 5]): the
    soft-argmax over the ``2 radius + 1`` square around each map's peak, and that square's mass."""
    location, confidence = decode_location(logits[:, :, None], radius=radius)
    return location[..., 1:], confidence
