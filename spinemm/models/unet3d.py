"""3D U-Net encoder (Çiçek et al. 2016) as a SliceEncoder: the whole series is one volume.

Slices are the depth axis. Downsampling happens in H and W only, so every slice keeps its own
token grid and the fusion module can still attend to (slice, patch) cells like with 2D backbones;
3x3x3 convolutions mix neighbouring slices at every stage, which is what the 2D backbones lack.
An optional skip-connected decoder climbs back up some stages for a finer token grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import SpineModelError
from .base import SliceEncoder
from .encoders import check_series


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two (Conv3d 3x3x3 -> BatchNorm3d -> ReLU), as in the 3D U-Net paper."""
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


class _UpStage(nn.Module):
    """Upsample H,W by 2 (transposed conv), concatenate the encoder skip, conv block."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cout, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.block = _conv_block(cout + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class UNet3DEncoder(SliceEncoder):
    """3D U-Net encoder over [N, S, C, H, W]; tokens per slice from the deepest used stage.

    Args:
        image_size: input H = W.
        width: token dim.
        channels: channels per encoder stage; stage i runs at stride 2**i in H and W.
        decoder_stages: skip-connected up stages after the bottleneck (0 = encoder only);
            the token grid stride is 2 ** (len(channels) - 1 - decoder_stages).
        in_chans: image channels C.
    """

    volumetric = True

    def __init__(
        self,
        image_size: int = 224,
        width: int = 512,
        channels: Sequence[int] = (32, 64, 128, 256, 320),
        decoder_stages: int = 0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels:
            raise SpineModelError("unet3d: `channels` must name at least one stage")
        if not 0 <= decoder_stages < len(channels):
            raise SpineModelError(
                f"unet3d: decoder_stages={decoder_stages} must be in [0, {len(channels) - 1}]"
            )
        stride = 2 ** (len(channels) - 1 - decoder_stages)
        if image_size % 2 ** (len(channels) - 1):
            raise SpineModelError(
                f"unet3d: image_size {image_size} must be divisible by {2 ** (len(channels) - 1)} "
                f"for {len(channels)} stages"
            )
        self.image_size = image_size
        self.width = width
        self.grid_size = (image_size // stride, image_size // stride)
        self.in_chans = in_chans
        self.down = nn.ModuleList(
            _conv_block(cin, cout) for cin, cout in zip((in_chans, *channels[:-1]), channels, strict=True)
        )
        # Pool H, W only: depth (slices) is never reduced so each slice keeps its tokens.
        self.pool = nn.MaxPool3d(kernel_size=(1, 2, 2))
        rev = channels[::-1]
        self.up = nn.ModuleList(_UpStage(rev[i], rev[i + 1], rev[i + 1]) for i in range(decoder_stages))
        self.proj = nn.Conv3d(rev[decoder_stages], width, kernel_size=1)

    def forward(self, series: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """series [N, S, C, H, W] in [0, 1] -> (tokens [N, S, h*w, width], pooled [N, S, width])."""
        n, s = check_series(series, self.in_chans, self.image_size, "unet3d")
        x = self.normalize(series).transpose(1, 2)  # [N, C, S, H, W]: slices are depth
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        for i, stage in enumerate(self.up):
            x = stage(x, skips[-2 - i])
        x = self.proj(x)  # [N, width, S, h, w]
        tokens = x.permute(0, 2, 3, 4, 1).reshape(n, s, -1, self.width)
        return tokens, tokens.mean(dim=2)

