"""Heads on the decoded queries: severity (3 logits) and location (joint logits over slices x patches).

The location logits of query q are the dot products of its projected output with the projected
tokens of every (slice, patch) of its own plane: the query's attention over slices and patches,
trained by the label coordinates (``spinemm.losses.location_loss``) and decoded by
:func:`decode_location`.
"""

from __future__ import annotations

import torch
from torch import nn


class SeverityHead(nn.Module):
    """Severity logits from each decoded query and the tokens under its predicted location.

    The ROI features are the memory pooled with the query's own location distribution, so the
    grade is read where the finding is (localise, then classify, as the strongest RSNA 2024
    solutions do) instead of only through the decoder's cross-attention. ``inputs`` features of
    [B, Q, D] -> [B, Q, num_classes]; shared by all queries (the query text sets the task).
    """

    def __init__(self, dim: int, num_classes: int = 3, inputs: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(inputs * dim)
        self.mlp = nn.Sequential(nn.Linear(inputs * dim, dim), nn.GELU(), nn.Linear(dim, num_classes))

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        """Each feature [B, Q, D] (the decoded query, the pooled ROI tokens)."""
        return self.mlp(self.norm(torch.cat(features, dim=-1)))


def pool_at_location(loc_logits: torch.Tensor, memory: torch.Tensor, query_plane: torch.Tensor) -> torch.Tensor:
    """loc_logits [B, Q, S, L], memory [B, P, S, L, D], query_plane [Q] -> ROI features [B, Q, D].

    Each query's tokens are averaged with the softmax of its location logits over its own plane.
    """
    probs = loc_logits.flatten(2).softmax(-1)  # [B, Q, S*L]
    # All planes, then pick each query's: [B, Q, P, D] is small, unlike gathering [B, Q, S*L, D].
    pooled = torch.einsum("bqn,bpnd->bqpd", probs, memory.flatten(2, 3))
    return pooled[:, torch.arange(probs.shape[1], device=probs.device), query_plane]


class LocationHead(nn.Module):
    """Joint logits over (slice, patch) of each query's plane."""

    def __init__(self, dim: int, loc_dim: int = 64) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, loc_dim)
        self.k_proj = nn.Linear(dim, loc_dim)
        self.scale = loc_dim**-0.5

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, query_plane: torch.Tensor) -> torch.Tensor:
        """queries [B, Q, D], memory [B, P, S, L, D], query_plane [Q] -> logits [B, Q, S, L]."""
        q = self.q_proj(queries)  # [B, Q, E]
        k = self.k_proj(memory)  # [B, P, S, L, E]
        # Scoring against all P planes then picking one is cheaper in memory than gathering the
        # keys of each query's plane ([B, Q, S, L, E]); Q and P are small.
        logits = torch.einsum("bqe,bpsle->bqpsl", q, k) * self.scale
        return logits[:, torch.arange(q.shape[1], device=q.device), query_plane]


def decode_location(loc_logits: torch.Tensor, radius: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """loc_logits [B, Q, S, h, w] -> (location [B, Q, 3] = (slice, x, y), confidence [B, Q]).

    The slice is the argmax of the slice marginal, moved towards its heavier neighbour by the
    marginal's mean over the argmax and that neighbour (a float in [0, S)): a stage trained to split
    a label between two shown slices, because the labelled slice lies between them
    (:func:`~spinemm.data.transforms.slice_position`), answers between them. x and y are the
    soft-argmax of the patch distribution within the argmax slice, at patch centres, normalised to
    [0, 1]. The confidence is the probability mass of the argmax slice.

    ``radius``: take the soft-argmax only over the ``(2 radius + 1)`` square of cells around the
    slice's peak, so a distribution split between two places (two neighbouring discs) gives one of
    them rather than the midpoint; the confidence is then the mass of that square.
    """
    *lead, s, h, w = loc_logits.shape
    probs = loc_logits.flatten(-3).softmax(-1).view(*lead, s, h, w)
    slice_probs = probs.sum(dim=(-1, -2))  # [B, Q, S]
    confidence, best = slice_probs.max(dim=-1)
    index = best[..., None, None, None].expand(*lead, 1, h, w)
    within = (
        probs.gather(-3, index).squeeze(-3) / confidence.clamp_min(1e-12)[..., None, None]
    )  # [B, Q, h, w]
    if radius is not None:
        peak = within.flatten(-2).argmax(-1)
        near_row = ((torch.arange(h, device=peak.device) - (peak // w)[..., None]).abs() <= radius)[..., :, None]
        near_col = ((torch.arange(w, device=peak.device) - (peak % w)[..., None]).abs() <= radius)[..., None, :]
        within = within * (near_row & near_col)
        mass = within.sum(dim=(-1, -2))
        within = within / mass.clamp_min(1e-12)[..., None, None]
        confidence = confidence * mass
    xs = (torch.arange(w, device=loc_logits.device, dtype=probs.dtype) + 0.5) / w
    ys = (torch.arange(h, device=loc_logits.device, dtype=probs.dtype) + 0.5) / h
    x = (within.sum(-2) * xs).sum(-1)
    y = (within.sum(-1) * ys).sum(-1)
    return torch.stack([_slice_between(slice_probs, best), x, y], dim=-1), confidence


def _slice_between(slice_probs: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """The argmax slice ``best`` moved towards its heavier neighbour: the mean slice under the
    marginal restricted to the two (``best`` itself when it has no neighbour)."""
    s = slice_probs.shape[-1]
    peak = slice_probs.gather(-1, best[..., None])[..., 0]
    lower = slice_probs.gather(-1, (best - 1).clamp(min=0)[..., None])[..., 0] * (best > 0)
    upper = slice_probs.gather(-1, (best + 1).clamp(max=s - 1)[..., None])[..., 0] * (best < s - 1)
    step = torch.where(upper > lower, 1.0, -1.0).to(slice_probs.dtype)
    neighbour = torch.maximum(lower, upper)
    return best.to(slice_probs.dtype) + step * neighbour / (peak + neighbour).clamp_min(1e-12)
