"""Training losses: severity (aligned with the official metric), location, level heatmaps and CLIP
contrastive.

``weighted_cross_entropy`` is the per-row part of it (one finding per row, weights 1 / 2 / 4),
for the second stage's grader and its study context.

``severity_loss`` is the official score (DESIGN §2) written as a differentiable function of logits,
so a batch's loss value is that batch's RSNA score (up to the metric's 1e-15 probability clip).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .constants import (
    LABEL_COLUMNS,
    METRIC_GROUPS,
    MISSING_LABEL,
    NUM_CLASSES,
    NUM_TARGETS,
    SEVERITY_WEIGHTS,
)
from .errors import SpineModelError

_SEVERE = 2
# Target indices (into LABEL_COLUMNS) of each metric group, and of the 5 spinal levels.
_GROUP_TARGETS: list[list[int]] = [
    [i for i, col in enumerate(LABEL_COLUMNS) if any(col.startswith(c + "_") for c in conds)]
    for conds in METRIC_GROUPS.values()
]
_SPINAL_TARGETS: list[int] = [
    i for i, col in enumerate(LABEL_COLUMNS) if col.startswith("spinal_canal_stenosis_")
]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Compute losses in at least float32 (bf16/fp16 logits under autocast); keep float64 as is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A zero that still depends on ``like``, so backward() works on batches with nothing to learn."""
    return like.sum() * 0.0


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``sum(w * CE) / sum(w)`` over rows ``logits [N, K]``, ``labels [N]``, with ``w`` = 1 / 2 / 4 for
    the true class, as the official score weights each row; ``-1`` labels are left out."""
    logits, labels = _upcast(logits), labels.long()
    valid = labels != MISSING_LABEL
    safe = labels.clamp(min=0)
    weights = torch.tensor(SEVERITY_WEIGHTS, dtype=logits.dtype, device=logits.device)[safe] * valid
    return (F.cross_entropy(logits, safe, reduction="none") * weights).sum() / weights.sum()


def severity_loss(logits: torch.Tensor, labels: torch.Tensor, any_severe_weight: float = 1.0) -> torch.Tensor:
    """Metric-aligned severity loss.

    Args:
        logits: ``[B, 25, 3]`` class logits, targets in ``LABEL_COLUMNS`` order.
        labels: ``[B, 25]`` int classes, ``-1`` = missing (ignored).
        any_severe_weight: weight of the any-severe-spinal term relative to one condition group.

    Each condition group (spinal 5 targets, foraminal 10, subarticular 10) contributes its weighted
    cross-entropy over the batch, ``sum(w * CE) / sum(w)`` with ``w`` = 1 / 2 / 4 for the true class.
    The any-severe term is a weighted BCE per study: label = any known spinal level is Severe,
    prediction = max over the known spinal levels of the softmax severe probability, weight = max
    known spinal weight. Studies with no known spinal label are left out; partially known studies
    use their known levels, exactly as the official metric treats a solution without those rows.
    The loss is ``(sum of group terms + any_severe_weight * any_severe) / (n_groups + any_severe_weight)``
    over the terms present in the batch, so with the default weight it equals the batch's RSNA score.
    A batch without any label returns a zero that keeps the graph.
    """
    if logits.ndim != 3 or logits.shape[1:] != (NUM_TARGETS, NUM_CLASSES):
        raise SpineModelError(f"logits must be [B, {NUM_TARGETS}, {NUM_CLASSES}], got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise SpineModelError(f"labels must be {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    labels = labels.long()
    valid = labels != MISSING_LABEL  # [B, 25]
    log_p = F.log_softmax(_upcast(logits), dim=-1)  # [B, 25, 3]
    safe = labels.clamp(min=0)
    nll = -log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [B, 25]
    class_w = torch.tensor(SEVERITY_WEIGHTS, dtype=log_p.dtype, device=log_p.device)
    weight = class_w[safe] * valid  # [B, 25], 0 where missing

    # Terms absent from the batch (no label in a group) drop out of both sums. Presence is kept as a
    # tensor so the loss never syncs with the host.
    total = _zero(logits).to(log_p.dtype)
    norm = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    for targets in _GROUP_TARGETS:
        w = weight[:, targets]
        total = total + (w * nll[:, targets]).sum() / w.sum().clamp_min(1.0)  # 0 / 1 if absent
        norm = norm + valid[:, targets].any()

    spinal = _SPINAL_TARGETS
    known = valid[:, spinal]  # [B, 5]
    if any_severe_weight > 0:
        # log of the max severe probability over known levels: max commutes with log, and taking the
        # level's own log-probabilities keeps log(1 - p) exact (log of its other two classes' mass).
        sev = log_p[:, spinal, _SEVERE].masked_fill(~known, float("-inf"))  # [B, 5]
        level = sev.argmax(dim=1, keepdim=True)  # [B, 1]; any level for studies with none known (w = 0)
        log_p_level = log_p[:, spinal].gather(1, level.unsqueeze(-1).expand(-1, -1, NUM_CLASSES)).squeeze(1)
        log_yes = log_p_level[:, _SEVERE]  # [B]
        log_no = torch.logsumexp(log_p_level[:, :_SEVERE], dim=-1)  # log(1 - p_severe)
        label = (labels[:, spinal] == _SEVERE).any(dim=1)
        w = weight[:, spinal].max(dim=1).values  # max known spinal weight, 0 if none known
        bce = -torch.where(label, log_yes, log_no)
        total = total + any_severe_weight * (w * bce).sum() / w.sum().clamp_min(1.0)
        norm = norm + any_severe_weight * known.any()
    return total / norm.clamp_min(1e-12)


def location_loss(
    loc_logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, coord_weight: float = 1.0
) -> torch.Tensor:
    """Cross-entropy on the target cell plus L1 on the soft-argmax position, over masked targets.

    Args:
        loc_logits: ``[B, 25, S, h, w]`` joint logits over slices x patch grid of each target's plane.
        target: ``[B, 25, 3]`` = (slice index in [0, S), x in [0, 1], y in [0, 1]).
        mask: ``[B, 25]`` bool, True where the target location is known.
        coord_weight: weight of the L1 term.

    The target cell is (slice, floor(y * h), floor(x * w)), clamped to the grid. A fractional slice
    (a labelled slice the resampled stack does not show, between two that it does:
    :func:`~spinemm.data.transforms.slice_position`) splits the cross-entropy's target between the
    two shown slices in proportion, so the decoded slice marginal can point between them; an
    integer slice is plain cross-entropy. The L1 term compares the expected (x, y) under the softmax
    over the nearer slice's ``h * w`` cells (cell centres at ``(j + 0.5) / w``) with the target,
    summed over x and y. Both terms are averaged over masked targets; with no True in ``mask`` the
    result is a zero that keeps the graph.
    """
    if loc_logits.ndim != 5 or loc_logits.shape[:2] != target.shape[:2] or target.shape[-1] != 3:
        raise SpineModelError(
            f"need loc_logits [B, 25, S, h, w] and target [B, 25, 3], got {tuple(loc_logits.shape)}, {tuple(target.shape)}"
        )
    if mask.shape != target.shape[:2]:
        raise SpineModelError(f"mask must be {tuple(target.shape[:2])}, got {tuple(mask.shape)}")
    mask = mask.bool()
    if not bool(mask.any()):
        return _zero(loc_logits)
    n_slices, h, w = loc_logits.shape[2:]
    logits = _upcast(loc_logits[mask])  # [M, S, h, w]
    tgt = _upcast(target[mask])  # [M, 3]
    position = tgt[:, 0].clamp(0, n_slices - 1)
    below = position.floor().long()
    above = (below + 1).clamp(max=n_slices - 1)
    share = position - below  # of the target on the shown slice above; 0 for a shown slice
    s = torch.where(share > 0.5, above, below)  # the nearer shown slice
    row = (tgt[:, 2] * h).floor().long().clamp(0, h - 1)
    col = (tgt[:, 1] * w).floor().long().clamp(0, w - 1)
    log_probs = logits.flatten(1).log_softmax(dim=-1)
    cell = row * w + col
    ce = -((1 - share) * log_probs.gather(1, (below * h * w + cell)[:, None])[:, 0]
           + share * log_probs.gather(1, (above * h * w + cell)[:, None])[:, 0]).mean()

    m = torch.arange(len(s), device=logits.device)
    p = logits[m, s].flatten(1).softmax(dim=-1).view(-1, h, w)  # [M, h, w] over the target slice
    xs = (torch.arange(w, device=p.device, dtype=p.dtype) + 0.5) / w
    ys = (torch.arange(h, device=p.device, dtype=p.dtype) + 0.5) / h
    ex = (p.sum(dim=1) * xs).sum(dim=-1)  # expected x: marginal over columns
    ey = (p.sum(dim=2) * ys).sum(dim=-1)  # expected y: marginal over rows
    l1 = ((ex - tgt[:, 1]).abs() + (ey - tgt[:, 2]).abs()).mean()
    return ce + coord_weight * l1


def soft_cell_targets(points: torch.Tensor, grid: int) -> torch.Tensor:
    """Points [M, 2] (x, y in [0, 1]) -> target distributions [M, grid * grid] over a square grid of
    cells: each point's mass split bilinearly over the four cell centres around it, so the
    target's expected position is the point itself (up to the border cells), not its cell's centre."""
    u = (points.clamp(0, 1) * grid - 0.5).clamp(0, grid - 1)  # in cell-centre units
    low = u.floor().clamp(max=grid - 2).long() if grid > 1 else torch.zeros_like(u, dtype=torch.long)
    frac = (u - low).clamp(0, 1)
    targets = points.new_zeros(points.shape[0], grid, grid)
    rows = torch.arange(points.shape[0], device=points.device)
    for dy in (0, 1):
        for dx in (0, 1):
            weight = (frac[:, 1] if dy else 1 - frac[:, 1]) * (frac[:, 0] if dx else 1 - frac[:, 0])
            row, col = (low[:, 1] + dy).clamp(max=grid - 1), (low[:, 0] + dx).clamp(max=grid - 1)
            targets.index_put_((rows, row, col), weight, accumulate=True)
    return targets.flatten(1)


def heatmap_loss(logits: torch.Tensor, points: torch.Tensor, mask: torch.Tensor, coord_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy of heatmaps [N, K, g, g] against :func:`soft_cell_targets` of ``points [N, K, 2]``,
    plus ``coord_weight`` x L1 between each map's soft-argmax and its point, over ``mask [N, K]``.

    The level locator's loss. With one-hot cell targets (as :func:`location_loss`), a heatmap that
    fits its training points sharpens onto one cell and decodes to the cell's centre, half a cell
    off; split targets keep the position inside the cell.
    """
    if logits.ndim != 4 or logits.shape[-1] != logits.shape[-2] or points.shape != (*logits.shape[:2], 2):
        raise SpineModelError(f"need logits [N, K, g, g] and points [N, K, 2], got {tuple(logits.shape)}, {tuple(points.shape)}")
    mask = mask.bool()
    if not bool(mask.any()):
        return _zero(logits)
    grid = logits.shape[-1]
    log_probs = _upcast(logits[mask]).flatten(1).log_softmax(-1)  # [M, g * g]
    target = _upcast(points[mask])
    ce = -(soft_cell_targets(target, grid) * log_probs).sum(-1).mean()
    probs = log_probs.exp().view(-1, grid, grid)
    centres = (torch.arange(grid, device=probs.device, dtype=probs.dtype) + 0.5) / grid
    expected = torch.stack([(probs.sum(1) * centres).sum(-1), (probs.sum(2) * centres).sum(-1)], dim=-1)
    return ce + coord_weight * (expected - target).abs().sum(-1).mean()


def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``image_embeds [N, D]`` and ``text_embeds [N, D]``.

    Embeddings are L2-normalised here; ``logit_scale`` is in log space (CLIP's parameter) and is
    exponentiated and clamped to 100. Without ``labels`` row ``i`` of each side matches only row
    ``i`` of the other. With ``labels [N]`` every pair sharing a label is a positive: the target of
    row ``i`` is uniform over the columns with its label, so two crops paired with the same severity
    prompt are not pushed apart.
    """
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise SpineModelError(
            f"need image and text embeddings of the same [N, D] shape, got {tuple(image_embeds.shape)}, {tuple(text_embeds.shape)}"
        )
    img = F.normalize(_upcast(image_embeds), dim=-1)
    txt = F.normalize(_upcast(text_embeds), dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=img.dtype, device=img.device).exp().clamp(max=100.0)
    logits = scale * img @ txt.t()  # [N, N]: image i vs text j
    if labels is None:
        target = torch.arange(len(img), device=img.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    if labels.shape != (len(img),):
        raise SpineModelError(f"labels must be [{len(img)}], got {tuple(labels.shape)}")
    same = (labels[:, None] == labels[None, :]).to(img.dtype)  # symmetric, diagonal is 1
    soft = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, soft) + F.cross_entropy(logits.t(), soft))
