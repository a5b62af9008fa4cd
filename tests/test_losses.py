"""Severity loss equals the official score, location loss targets the right cell, heatmap loss keeps
sub-cell positions, CLIP loss behaves."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spinemm.errors import SpineModelError
from spinemm.losses import (
    clip_loss,
    heatmap_loss,
    location_loss,
    severity_loss,
    soft_cell_targets,
    weighted_cross_entropy,
)
from spinemm.metrics import rsna_score, solution_frame, submission_frame
from spinemm.models.heads import decode_location


def random_batch(seed: int, b: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, 25, 3, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(-1, 3, (b, 25), generator=g)
    labels[0, :5] = torch.tensor([0, 1, 2, -1, 0])
    labels[:, 5], labels[:, 20] = 0, 1  # every group has labels
    return logits, labels


@pytest.mark.parametrize("seed", range(3))
def test_severity_loss_equals_official_score(seed):
    logits, labels = random_batch(seed)
    ids = list(range(100, 100 + len(labels)))
    score = rsna_score(solution_frame(ids, labels.numpy()), submission_frame(ids, logits.softmax(-1).numpy()))
    assert severity_loss(logits, labels).item() == pytest.approx(score, abs=1e-9)


def test_ignores_missing_labels_and_gradients_flow():
    logits, labels = random_batch(7)
    logits.requires_grad_(True)
    loss = severity_loss(logits, labels)
    loss.backward()
    grad = logits.grad
    assert torch.isfinite(grad).all()
    missing = labels == -1
    assert missing.any() and (grad[missing] == 0).all()
    assert (grad[~missing].abs().sum(-1) > 0).all()
    # Changing logits of missing targets does not change the loss.
    moved = logits.detach().clone()
    moved[missing] += 5.0
    assert severity_loss(moved, labels).item() == pytest.approx(loss.item(), abs=1e-12)


def test_official_weights_by_hand():
    logits = torch.randn(1, 25, 3, dtype=torch.float64)
    labels = torch.full((1, 25), -1)
    labels[0, 0], labels[0, 1] = 0, 2  # one Normal/Mild and one Severe spinal level
    nll = -F.log_softmax(logits[0, :2], -1)[[0, 1], [0, 2]]
    group = (1 * nll[0] + 4 * nll[1]) / 5
    assert severity_loss(logits, labels, any_severe_weight=0.0).item() == pytest.approx(
        group.item(), abs=1e-12
    )
    # Any severe: label 1 (L2/L3 is Severe), p = max severe prob over the two known levels, weight 4.
    p = logits[0, :2].softmax(-1)[:, 2].max()
    any_severe = -torch.log(p)
    expected = (group + 0.5 * any_severe) / 1.5
    assert severity_loss(logits, labels, any_severe_weight=0.5).item() == pytest.approx(
        expected.item(), abs=1e-12
    )
    # A Severe truth weighs 4x a Normal one: raising its loss moves the group loss 4x as much.
    worse = logits.clone()
    worse[0, 1, 2] -= 1.0
    d_severe = severity_loss(worse, labels, 0.0) - severity_loss(logits, labels, 0.0)
    worse = logits.clone()
    worse[0, 0, 0] -= 1.0
    d_normal = severity_loss(worse, labels, 0.0) - severity_loss(logits, labels, 0.0)
    assert d_severe > d_normal > 0


def test_no_labels_gives_zero_with_graph_and_half_precision_works():
    logits = torch.randn(2, 25, 3, requires_grad=True)
    loss = severity_loss(logits, torch.full((2, 25), -1))
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()
    half = severity_loss(torch.randn(2, 25, 3).bfloat16(), torch.randint(0, 3, (2, 25)))
    assert half.dtype == torch.float32 and torch.isfinite(half)
    with pytest.raises(SpineModelError):
        severity_loss(torch.randn(2, 24, 3), torch.zeros(2, 24, dtype=torch.long))


def location_case():
    b, n_slices, h, w = 2, 4, 5, 6
    target = torch.zeros(b, 25, 3)
    target[..., 0] = 2.0  # slice 2
    target[..., 1] = 0.3  # x -> column floor(1.8) = 1, centre 1.5 / 6 = 0.25
    target[..., 2] = 0.75  # y -> row floor(3.75) = 3, centre 3.5 / 5 = 0.7
    mask = torch.zeros(b, 25, dtype=torch.bool)
    mask[0, 3] = mask[1, 10] = True
    return torch.zeros(b, 25, n_slices, h, w), target, mask


def test_location_loss_on_the_target_cell():
    logits, target, mask = location_case()
    uniform = location_loss(logits, target, mask)
    # Uniform logits: CE = ln(S*h*w), soft-argmax at the image centre.
    assert uniform.item() == pytest.approx(math.log(4 * 5 * 6) + abs(0.5 - 0.3) + abs(0.5 - 0.75), abs=1e-5)
    peaked = logits.clone()
    peaked[..., 2, 3, 1] = 60.0  # all mass on the target cell of every target
    loss = location_loss(peaked, target, mask)
    assert loss.item() == pytest.approx(abs(0.25 - 0.3) + abs(0.7 - 0.75), abs=1e-5)
    elsewhere = logits.clone()
    elsewhere[..., 0, 0, 0] = 60.0
    assert location_loss(elsewhere, target, mask) > uniform > loss
    # Unmasked targets do not matter.
    noisy = peaked.clone()
    noisy[~mask] = torch.randn_like(noisy[~mask]) * 10
    assert location_loss(noisy, target, mask).item() == pytest.approx(loss.item(), abs=1e-6)


def test_a_slice_between_shown_slices_splits_the_target():
    """A labelled slice the resampled stack does not show lies between two that it does (position
    2.4: 60% on slice 2, 40% on slice 3); the loss is least when the mass is split so, and the
    decoded slice then points between them."""
    logits, target, mask = location_case()
    target[..., 0] = 2.4
    split = logits.clone()
    split[..., 2, 3, 1] = math.log(0.6) + 60.0
    split[..., 3, 3, 1] = math.log(0.4) + 60.0
    entropy = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    loss = location_loss(split, target, mask)
    assert loss.item() == pytest.approx(entropy + abs(0.25 - 0.3) + abs(0.7 - 0.75), abs=1e-4)
    for shares in ((1.0, 1e-9), (0.5, 0.5), (0.8, 0.2)):  # any other split costs more
        other = logits.clone()
        other[..., 2, 3, 1] = math.log(shares[0]) + 60.0
        other[..., 3, 3, 1] = math.log(shares[1]) + 60.0
        assert location_loss(other, target, mask) > loss
    location, _ = decode_location(split)
    assert location[0, 3, 0].item() == pytest.approx(2.4, abs=1e-4)


def test_location_loss_decreases_under_gradient_descent():
    logits, target, mask = location_case()
    param = torch.nn.Parameter(torch.randn_like(logits) * 0.1)
    opt = torch.optim.SGD([param], lr=5.0)
    losses = []
    for _ in range(30):
        loss = location_loss(param, target, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert param.grad[~mask].abs().sum() == 0


def test_location_loss_empty_mask_and_shapes():
    logits, target, mask = location_case()
    logits.requires_grad_(True)
    loss = location_loss(logits, target, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None
    target[..., 0], target[..., 1:] = 99.0, 1.0  # out-of-range targets clamp to the last cell
    assert torch.isfinite(location_loss(logits, target, mask))
    with pytest.raises(SpineModelError):
        location_loss(logits, target[:, :24], mask)


def test_clip_loss_symmetric_and_prefers_matched_pairs():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(8, 16, generator=g)
    txt = img + 0.3 * torch.randn(8, 16, generator=g)
    scale = torch.tensor(math.log(10.0))
    matched = clip_loss(img, txt, scale)
    assert matched.item() == pytest.approx(clip_loss(txt, img, scale).item(), abs=1e-6)
    assert matched < clip_loss(img, txt[torch.randperm(8, generator=g)], scale)
    # Normalised inside; the scale is clamped to 100.
    assert clip_loss(img * 3, txt * 0.1, scale).item() == pytest.approx(matched.item(), abs=1e-5)
    assert clip_loss(img, txt, 10.0).item() == pytest.approx(
        clip_loss(img, txt, math.log(100.0)).item(), abs=1e-5
    )
    # Gradient reaches the embeddings and the learnable scale.
    scale = torch.nn.Parameter(torch.tensor(1.0))
    emb = torch.nn.Parameter(img.clone())
    clip_loss(emb, txt, scale).backward()
    assert scale.grad is not None and emb.grad.abs().sum() > 0


def test_clip_loss_labels_make_same_class_columns_positives():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    txt = torch.randn(8, 16, generator=g)  # e.g. different templates of each class's severity prompt
    partner = torch.tensor([3, 4, 5, 6, 7, 2, 0, 1])  # another row of the same class (5 <-> 2)
    assert (labels[partner] == labels).all()
    img = txt[partner] + 0.1 * torch.randn(8, 16, generator=g)
    # Image i sits on a same-class text that is not its own pair: a positive only with labels.
    with_labels = clip_loss(img, txt, 2.0, labels=labels)
    assert with_labels < clip_loss(img, txt, 2.0) - 0.5
    # Distinct labels reduce to plain InfoNCE.
    distinct = clip_loss(img, txt, 2.0, labels=torch.arange(8))
    assert distinct.item() == pytest.approx(clip_loss(img, txt, 2.0).item(), rel=1e-5)
    # Soft targets by hand: row i is uniform over the columns sharing its label, both directions.
    i, t = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = math.exp(2.0) * i @ t.t()
    same = (labels[:, None] == labels[None, :]).float()
    soft = same / same.sum(1, keepdim=True)
    by_hand = 0.5 * (
        -(soft * logits.log_softmax(1)).sum(1).mean() - (soft * logits.t().log_softmax(1)).sum(1).mean()
    )
    assert with_labels.item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_weighted_cross_entropy_weights_rows_by_class_and_skips_missing():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, -1, 2, 0])
    nll = -logits.log_softmax(-1)
    expected = (nll[0, 0] + 2 * nll[1, 1] + 4 * nll[2, 2] + 4 * nll[4, 2] + nll[5, 0]) / (1 + 2 + 4 + 4 + 1)
    torch.testing.assert_close(weighted_cross_entropy(logits, labels), expected)


def test_soft_cell_targets_keep_the_point_inside_its_cell():
    points = torch.tensor([[0.31, 0.72], [0.5, 0.5], [0.9, 0.12]])
    targets = soft_cell_targets(points, 8).view(-1, 8, 8)
    centres = (torch.arange(8) + 0.5) / 8
    torch.testing.assert_close(targets.sum((1, 2)), torch.ones(3))
    torch.testing.assert_close((targets.sum(1) * centres).sum(-1), points[:, 0])  # expected x
    torch.testing.assert_close((targets.sum(2) * centres).sum(-1), points[:, 1])  # expected y
    assert int((targets[0] > 0).sum()) == 4  # split over the four surrounding cell centres


def test_heatmap_loss_fits_a_sub_cell_position():
    from spinemm.models.locator import decode_heatmaps

    point = torch.tensor([[[0.37, 0.58]]])  # inside cell (2, 4) of 8, off its centre (0.3125, 0.5625)
    logits = torch.zeros(1, 1, 8, 8, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.2)
    for _ in range(300):
        loss = heatmap_loss(logits, point, torch.ones(1, 1, dtype=torch.bool))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    xy, _ = decode_heatmaps(logits.detach())
    torch.testing.assert_close(xy, point, atol=0.01, rtol=0)
    with pytest.raises(SpineModelError, match="need logits"):
        heatmap_loss(torch.zeros(1, 1, 8, 4), point, torch.ones(1, 1, dtype=torch.bool))
    assert heatmap_loss(logits, point, torch.zeros(1, 1, dtype=torch.bool)).item() == 0.0
