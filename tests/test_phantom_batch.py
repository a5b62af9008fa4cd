"""Every backbone (tiny variants) and the no-text ablation, forward + backward on a real phantom batch."""

from __future__ import annotations

import pytest
import torch

import spinemm
from spinemm.data import SpineDataset, collate
from spinemm.inference import preprocess_settings
from spinemm.losses import location_loss, severity_loss
from spinemm.models.baselines import TINY_TEXT_CONFIGS, TINY_VISION_CONFIGS

VARIANTS = {"clip": {}, **{name: {"vision": cfg} for name, cfg in TINY_VISION_CONFIGS.items()},
            "no-text": {"text": TINY_TEXT_CONFIGS["none"]}}


def _batch(model, root):
    dataset = SpineDataset(root, split="train", **preprocess_settings(model))
    return collate([dataset[0], dataset[1]])


def _loss(model, batch):
    out = model(batch)
    return out, severity_loss(out["logits"], batch["label"]) + location_loss(
        out["loc_logits"], batch["location"], batch["location_mask"])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_backward_on_phantom_batch(name, phantom_root):
    torch.manual_seed(0)
    model = spinemm.create_model("spine-tiny", num_slices=4, **VARIANTS[name])
    batch = _batch(model, phantom_root)
    out, loss = _loss(model, batch)
    s = batch["image"].shape[2]
    h, w = model.vision.grid_size
    assert out["logits"].shape == (2, 25, 3)
    assert out["loc_logits"].shape == (2, 25, s, h, w)
    assert out["location"].shape == (2, 25, 3) and out["location_confidence"].shape == (2, 25)
    assert torch.isfinite(loss)
    loss.backward()
    vision_grad = sum(p.grad.abs().sum() for p in model.vision.parameters() if p.grad is not None)
    assert vision_grad > 0, "the backbone got no gradient"
    assert model.severity_head.mlp[0].weight.grad.abs().sum() > 0


def test_lora_trains_only_adapters_fusion_and_heads_on_phantom_batch(phantom_root):
    torch.manual_seed(0)
    model = spinemm.models.add_lora(spinemm.create_model("spine-tiny", num_slices=4), r=4)
    _, loss = _loss(model, _batch(model, phantom_root))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for name in with_grad:
        if name.startswith(("vision.", "text.")):
            assert "lora_" in name, f"frozen tower weight {name} got a gradient"
    assert any("lora_" in n and n.startswith("vision.") for n in with_grad)
    assert any("lora_" in n and n.startswith("text.") for n in with_grad)
    assert any(n.startswith(("decoder.", "severity_head.", "location_head.")) for n in with_grad)
