"""Multi-head attention on plain ``nn.Linear`` projections, converted from ``nn.MultiheadAttention``.

open_clip's native ViT (<= 3.3) packs q/k/v into ``MultiheadAttention.in_proj_weight``. peft's LoRA
on that module needs special handling (its merge has a known ``out_proj`` bug) and torch.compile
cannot trace peft's MultiheadAttention path (DESIGN §6). :class:`Attention` keeps the same maths
with four ordinary Linear layers (``q_proj, k_proj, v_proj, out_proj``), so LoRA targets plain
Linears and the whole tower compiles. :func:`convert_multihead_attention` swaps them in place,
copying weights exactly, so a pretrained tower gives the same outputs before and after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention on ``F.scaled_dot_product_attention``.

    Call-compatible with ``nn.MultiheadAttention(batch_first=...)`` for the arguments open_clip
    uses: ``attn(query, key, value, need_weights=False, attn_mask=None) -> (out, weights | None)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        kdim = kdim or dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.batch_first = batch_first
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(kdim, dim, bias=bias)
        self.v_proj = nn.Linear(kdim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # [N, L, dim] -> [N, heads, L, head_dim]
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query [N, Lq, dim], key/value [N, Lk, kdim] (default: query) -> ([N, Lq, dim], weights).

        ``attn_mask`` is additive (float) or boolean with True = *blocked*, as in
        ``nn.MultiheadAttention``; shapes [Lq, Lk], [N, Lq, Lk] or [N, heads, Lq, Lk].
        With ``need_weights`` the head-averaged attention probabilities [N, Lq, Lk] are returned.
        """
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:  # [L, N, D] like nn.MultiheadAttention's default
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = (
            self._heads(self.q_proj(query)),
            self._heads(self.k_proj(key)),
            self._heads(self.v_proj(value)),
        )
        mask = _sdpa_mask(attn_mask, q.dtype)
        weights = None
        if need_weights:
            # Explicit path: same maths as SDPA, but the probabilities are kept for the caller.
            scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
            if mask is not None:
                scores = (
                    scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
                )
            probs = scores.softmax(dim=-1)
            weights = probs.mean(dim=1)
            probs = F.dropout(probs, self.dropout, self.training)
            out = probs @ v
        else:
            drop = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        out = self.out_proj(out.transpose(1, 2).flatten(-2))  # [N, Lq, dim]
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> Attention:
        """An :class:`Attention` with exactly the weights of ``mha`` (split from its packed in-projection)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("cannot convert nn.MultiheadAttention with add_bias_kv or add_zero_attn")
        if not mha._qkv_same_embed_dim and mha.kdim != mha.vdim:
            raise ValueError("cannot convert nn.MultiheadAttention with kdim != vdim")
        dim = mha.embed_dim
        bias = mha.in_proj_bias is not None
        new = cls(
            dim, mha.num_heads, kdim=mha.kdim, bias=bias, batch_first=mha.batch_first, dropout=mha.dropout
        )
        factory = {"device": mha.out_proj.weight.device, "dtype": mha.out_proj.weight.dtype}
        new.to(**factory)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3, dim=0)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for proj, w in zip((new.q_proj, new.k_proj, new.v_proj), (wq, wk, wv), strict=True):
                proj.weight.copy_(w)
            if bias:
                for proj, b in zip(
                    (new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3), strict=True
                ):
                    proj.bias.copy_(b)
                new.out_proj.bias.copy_(mha.out_proj.bias)
            new.out_proj.weight.copy_(mha.out_proj.weight)
        new.train(mha.training)
        return new


def _sdpa_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention mask semantics (bool True = blocked) -> SDPA's (bool True = allowed)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return ~attn_mask
    return attn_mask.to(dtype)


def convert_multihead_attention(module: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` inside ``module`` by an equal :class:`Attention`.

    Returns the number of modules converted. Outputs are unchanged up to float rounding.
    """
    targets = [
        (name, child)
        for name, child in module.named_modules()
        if name and isinstance(child, nn.MultiheadAttention)
    ]
    for name, mha in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, Attention.from_multihead(mha))
    return len(targets)
