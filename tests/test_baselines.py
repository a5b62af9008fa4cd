"""Baseline backbones (cnn, resnet50, efficientnet, unet3d) and the no-text ablation, tiny settings only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spinemm
from spinemm.constants import LABEL_COLUMNS, PLANES
from spinemm.data import collate
from spinemm.errors import SpineModelError
from spinemm.models.baselines import (
    TINY_VISION_CONFIGS,
    LearnedQueries,
    TimmConvEncoder,
    timm_weights_file,
)
from spinemm.models.config import VisionConfig
from spinemm.models.registry import VISION_BUILDERS, BuildContext
from spinemm.text import QUERY_TEXTS

KINDS = sorted(TINY_VISION_CONFIGS)


def _encoder(kind: str, image_size: int = 32):
    cfg = VisionConfig(**{**TINY_VISION_CONFIGS[kind], "image_size": image_size})
    return VISION_BUILDERS[cfg.type](cfg, BuildContext(embed_dim=64)), cfg


def _sample(num_slices: int, size: int, seed: int, plane_mask=(True, True, True)) -> dict:
    """One study in the CONTRACTS sample format (synthetic values)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor(plane_mask)
    image = torch.rand(len(PLANES), num_slices, 3, size, size, generator=gen) * mask[:, None, None, None, None]
    label = torch.randint(-1, 3, (len(LABEL_COLUMNS),), generator=gen)
    return {
        "image": image, "plane_mask": mask, "text": list(QUERY_TEXTS), "label": label,
        "location": torch.rand(len(LABEL_COLUMNS), 3, generator=gen) * torch.tensor([num_slices, 1.0, 1.0]),
        "location_mask": label >= 0,
        "meta": {"study_id": seed, "series_ids": [1, 2, 3], "instance_numbers": [np.arange(num_slices)] * 3,
                 "original_shape": [(size, size)] * 3, "pixel_spacing": [(1.0, 1.0)] * 3},
    }


@pytest.mark.parametrize("kind", KINDS)
def test_forward_shapes_and_backward(kind):
    torch.manual_seed(0)
    encoder, cfg = _encoder(kind)
    series = torch.rand(2, 4, 3, 32, 32)
    tokens, pooled = encoder(series)
    h, w = encoder.grid_size
    assert tokens.shape == (2, 4, h * w, encoder.width)
    assert pooled.shape == (2, 4, encoder.width)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()
    # the builder writes the normalisation it used back into the config (saved folders rebuild it)
    assert cfg.mean == tuple(encoder.image_mean) and len(cfg.std) == 3
    (tokens.square().mean() + pooled.square().mean()).backward()
    params = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"{kind}: no grad for {missing[:5]}"
    assert sum(p.grad.abs().sum().item() for _, p in params) > 0


def test_grids_follow_strides():
    assert _encoder("cnn", 64)[0].grid_size == (8, 8)  # 3 max-pools
    assert _encoder("unet3d", 64)[0].grid_size == (16, 16)  # 3 downsamplings, 1 decoder stage back up
    assert _encoder("resnet50", 64)[0].grid_size == (4, 4)  # output_stride 16


@pytest.mark.parametrize("slope", [0.0, 0.01])
def test_the_cnn_pools_before_its_relu_and_computes_the_papers_conv_relu_pool(slope):
    """PlainCNN runs Conv -> MaxPool -> ReLU (a quarter of the ReLU work); that is the paper's
    Conv -> ReLU -> MaxPool exactly, in the forward and in every gradient. A leaky ReLU
    (``negative_slope``) is monotone too, so the same holds for it."""
    cfg = VisionConfig(**{**TINY_VISION_CONFIGS["cnn"], "image_size": 32,
                          "kwargs": {**TINY_VISION_CONFIGS["cnn"]["kwargs"], "negative_slope": slope}})
    encoder = VISION_BUILDERS["cnn"](cfg, BuildContext(embed_dim=64))
    stages = list(encoder.features)
    assert [type(m).__name__ for m in stages[:3]] == ["Conv2d", "MaxPool2d", "LeakyReLU" if slope else "ReLU"]
    images = torch.randn(6, 3, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_(True)

    def paper_order(x: torch.Tensor) -> torch.Tensor:
        for conv in stages[0::3]:
            x = torch.nn.functional.max_pool2d(torch.nn.functional.leaky_relu(conv(x), slope), 2)
        return x

    ours = encoder.features(images)
    theirs = paper_order(images)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    weights = torch.randn_like(ours)
    ours_grads = torch.autograd.grad((ours * weights).sum(), [images, stages[0].weight])
    theirs_grads = torch.autograd.grad((theirs * weights).sum(), [images, stages[0].weight])
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind,mixes", [("unet3d", True), ("cnn", False), ("resnet50", False)])
def test_only_the_3d_encoder_mixes_slices(kind, mixes):
    torch.manual_seed(0)
    encoder, _ = _encoder(kind)
    encoder.eval()  # BatchNorm statistics would couple the images of a batch
    series = torch.rand(1, 4, 3, 32, 32)
    changed = series.clone()
    changed[:, 0] = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        diff = (encoder(series)[0] - encoder(changed)[0]).abs().amax(dim=(0, 2, 3))  # per slice
    assert diff[0] > 1e-4
    assert (diff[1] > 1e-6) == mixes  # slice 1 sees slice 0 only through 3D convolutions


def test_bad_inputs_and_options_raise():
    encoder, _ = _encoder("cnn")
    with pytest.raises(SpineModelError, match=r"\[N, S, 3, 32, 32\]"):
        encoder(torch.rand(2, 4, 3, 48, 48))
    with pytest.raises(SpineModelError, match="N, S, C, H, W"):
        encoder(torch.rand(4, 3, 32, 32))
    with pytest.raises(SpineModelError, match="divisible"):
        _encoder("cnn", image_size=36)
    cfg = VisionConfig(type="cnn", image_size=32, kwargs={"widht": 8})
    with pytest.raises(SpineModelError, match="widht"):
        VISION_BUILDERS["cnn"](cfg, BuildContext(embed_dim=64))
    with pytest.raises(SpineModelError, match="unknown timm model"):
        TimmConvEncoder("no_such_net", image_size=32)


def test_pretrained_offline_names_the_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SpineModelError, match="timm/resnet50") as err:
        timm_weights_file("resnet50", True)
    assert "hf download" in str(err.value)
    assert timm_weights_file("resnet50", None) is None


def test_local_weight_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = TimmConvEncoder("test_resnet", image_size=32)
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.trunk.state_dict().items()}, str(path))
    torch.manual_seed(2)
    loaded = TimmConvEncoder("test_resnet", image_size=32, weights_file=timm_weights_file("test_resnet", str(path)))
    for key, value in source.trunk.state_dict().items():
        assert torch.equal(loaded.trunk.state_dict()[key], value), key


@pytest.mark.parametrize("kind", KINDS)
def test_create_model_with_each_backbone(kind, tmp_path):
    torch.manual_seed(0)
    model = spinemm.create_model("spine-tiny", vision=TINY_VISION_CONFIGS[kind])
    size, slices = model.image_size, 4
    batch = collate([_sample(slices, size, 0), _sample(slices, size, 1, plane_mask=(True, False, True))])
    out = model(batch)
    h, w = model.vision.grid_size
    assert out["logits"].shape == (2, 25, 3)
    assert out["loc_logits"].shape == (2, 25, slices, h, w)
    loss = spinemm.losses.severity_loss(out["logits"], batch["label"])
    # the dual-encoder path uses the pooled output (the CNN's FC layer), the fusion the tokens
    loss = loss + model.encode_image(batch["image"][:, 0, 0]).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.vision.parameters())
    # a saved baseline model rebuilds offline from its own config and gives the same outputs
    model.eval()
    model.save_pretrained(tmp_path / kind)
    again = spinemm.load_model(tmp_path / kind).eval()
    with torch.no_grad():
        assert torch.allclose(model(batch)["logits"], again(batch)["logits"], atol=1e-6)


def test_no_text_ablation_gives_25_distinct_queries():
    torch.manual_seed(0)
    tower = LearnedQueries(width=16)
    tokens, mask, pooled = tower.encode(list(QUERY_TEXTS))
    assert tokens.shape == (25, 1, 16) and mask.all() and pooled.shape == (25, 16)
    assert torch.cdist(pooled, pooled).add(torch.eye(25) * 1e3).min() > 0  # all pairwise distinct
    again = tower.encode([QUERY_TEXTS[3], QUERY_TEXTS[0]])[2]
    assert torch.equal(again, pooled[[3, 0]])  # looked up by position in QUERY_TEXTS
    with pytest.raises(SpineModelError, match="QUERY_TEXTS"):
        tower.encode(["a free-text prompt"])

    model = spinemm.create_model("spine-tiny", text={"type": "none"})
    assert isinstance(model.text, LearnedQueries)
    queries = model.encode_queries(None, batch_size=2)  # [2, 25, dim]
    assert queries.shape[:2] == (2, 25)
    assert torch.cdist(queries[0], queries[0]).add(torch.eye(25) * 1e3).min() > 0
    out = model(collate([_sample(2, model.image_size, 0)]))
    out["logits"].sum().backward()
    assert model.text.embed.grad is not None and model.text.embed.grad.abs().sum() > 0


# That unet3d does not import baselines (no import circle) is checked in a fresh interpreter by
# tests/test_dependencies.py::test_core_paths_do_not_import_datasets, beside the datasets check.
