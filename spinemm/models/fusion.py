"""Fusion: text queries cross-attend to the slice tokens of their own series (MedKLIP / BLIP style).

Shapes: B studies, P = 3 planes, S slices, L = h*w patch tokens per slice, Q = 25 queries, D = dim.
Each series is encoded once; the 5-10 queries read on its plane share its tokens. One attention
call covers all planes: the keys are every plane's tokens plus a learned "missing" token, and a
mask lets query q see only the tokens of plane ``TARGET_PLANE_INDEX[q]`` (or, where the study has
no such series, only the missing token), so queries never read the wrong series.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpineModelError
from .attention import Attention


class SlicePlaneEmbedding(nn.Module):
    """Adds a learned slice-position embedding and a plane embedding to tokens [B, P, S, L, D].

    With a different slice count than trained, the slice table is linearly resampled, so a model
    trained on 16 slices still reads 8 or 24.
    """

    def __init__(self, dim: int, num_slices: int, num_planes: int) -> None:
        super().__init__()
        self.slice_pos = nn.Parameter(torch.randn(num_slices, dim) * 0.02)
        self.plane = nn.Parameter(torch.randn(num_planes, dim) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        num_slices = tokens.shape[2]
        pos = self.slice_pos
        if num_slices != pos.shape[0]:
            pos = F.interpolate(pos.T[None], size=num_slices, mode="linear", align_corners=True)[0].T
        return tokens + pos[None, None, :, None, :] + self.plane[None, :, None, None, :]


class DecoderLayer(nn.Module):
    """Pre-norm: queries self-attend, cross-attend to memory, then an MLP; each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout=dropout)
        self.cross_attn = Attention(dim, heads, dropout=dropout)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(
        self, queries: torch.Tensor, memory: torch.Tensor, blocked: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """queries [B, Q, D], memory [B, K, D], blocked [B, 1, Q, K] (True = may not attend)."""
        x = self.norm1(queries)
        queries = queries + self.drop(self.self_attn(x)[0])
        attended, weights = self.cross_attn(
            self.norm2(queries), memory, need_weights=need_weights, attn_mask=blocked
        )
        queries = queries + self.drop(attended)
        queries = queries + self.drop(self.mlp(self.norm3(queries)))
        return queries, weights


class QueryDecoder(nn.Module):
    """``layers`` decoder layers over Q queries; query q reads plane ``query_planes[q]`` only."""

    def __init__(
        self,
        dim: int,
        layers: int,
        heads: int,
        query_planes: Sequence[int],
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise SpineModelError(f"fusion.layers must be >= 1, got {layers}")
        self.register_buffer(
            "query_plane", torch.as_tensor(list(query_planes), dtype=torch.long), persistent=False
        )
        self.missing = nn.Parameter(torch.randn(dim) * 0.02)  # what a query reads when its series is absent
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def blocked_keys(self, plane_mask: torch.Tensor, keys_per_plane: int) -> torch.Tensor:
        """plane_mask [B, P] -> blocked [B, Q, P*K + 1]: True where query q may not look."""
        num_planes = plane_mask.shape[1]
        key_plane = torch.arange(num_planes, device=plane_mask.device).repeat_interleave(keys_per_plane)
        own = key_plane[None, :] == self.query_plane[:, None]  # [Q, P*K]
        present = plane_mask[:, self.query_plane]  # [B, Q]: does the query's series exist?
        allowed = torch.cat([own[None] & present[..., None], ~present[..., None]], dim=-1)
        return ~allowed

    def forward(
        self, queries: torch.Tensor, memory: torch.Tensor, plane_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Q, D], memory [B, P, K, D], plane_mask [B, P] bool
        -> (outputs [B, Q, D], last-layer cross-attention over own-plane keys [B, Q, K], head-averaged)."""
        b, num_planes, keys, dim = memory.shape
        flat = torch.cat([memory.flatten(1, 2), self.missing.expand(b, 1, dim)], dim=1)  # [B, P*K + 1, D]
        blocked = self.blocked_keys(plane_mask, keys)[:, None]  # [B, 1, Q, P*K + 1], broadcast over heads
        weights = None
        for i, layer in enumerate(self.layers):
            queries, weights = layer(queries, flat, blocked, need_weights=i == len(self.layers) - 1)
        own = weights[..., :-1].unflatten(-1, (num_planes, keys))  # [B, Q, P, K]
        index = self.query_plane.view(1, -1, 1, 1).expand(b, -1, 1, keys)
        return self.norm(queries), own.gather(2, index).squeeze(2)
