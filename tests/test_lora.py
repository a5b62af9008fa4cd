"""LoRA on the towers (peft): targets, frozen bases, adapter save/load, checked merge, compile."""

from __future__ import annotations

import copy

import pytest
import torch
from peft.tuners.lora import LoraLayer

import spinemm
from spinemm.errors import SpineModelError
from spinemm.models.baselines import TINY_VISION_CONFIGS
from spinemm.models.lora import (
    TARGET_PATTERNS,
    adapter_state_dict,
    add_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    probe_batch,
    resolve_targets,
    save_adapter,
    trainable_parameter_summary,
)

TIMM_VIT = {"type": "timm", "model_name": "test_vit", "pretrained": False, "open_clip_cfg": None,
            "mean": None, "std": None, "kwargs": {"img_size": 32, "patch_size": 8}}


def _model(**overrides):
    torch.manual_seed(0)
    return spinemm.create_model("spine-tiny", **overrides)


def _perturb_adapters(model) -> None:
    """lora_B starts at zero (an adapter is a no-op at first): give it values, as training would."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch)


def test_auto_targets_per_tower_kind():
    model = _model()
    assert resolve_targets(model.vision)[0] == "open_clip_vit"
    assert resolve_targets(model.text)[0] == "bert"
    assert resolve_targets(_model(vision={"convert_attention": False}).vision)[0] == "open_clip_vit_mha"
    assert resolve_targets(_model(vision=TIMM_VIT).vision)[0] == "timm_vit"
    for kind in TINY_VISION_CONFIGS:  # ConvNets and the 3D U-Net: full fine-tune
        assert resolve_targets(_model(vision=TINY_VISION_CONFIGS[kind]).vision) is None
    assert resolve_targets(_model(text={"type": "none"}).text) is None

    add_lora(model, r=4)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.vision.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"}
    adapted = {name.split("layer.")[1].split(".", 1)[1] for name, m in model.text.named_modules()
               if isinstance(m, LoraLayer)}
    assert adapted == {"attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense", "intermediate.dense", "output.dense"}
    # only the towers: the fusion decoder's own q_proj/k_proj/v_proj/out_proj stay plain Linears
    assert not any(isinstance(m, LoraLayer) for m in model.decoder.modules())


def test_only_adapters_fusion_and_heads_get_grads():
    model = add_lora(_model(), r=4, dropout=0.1)
    batch = probe_batch(model, num_slices=3)
    out = model(batch)
    labels = torch.randint(0, 3, (1, 25))
    loss = spinemm.losses.severity_loss(out["logits"], labels) + out["loc_logits"].square().mean()
    images, texts = batch["image"][0, :, 0], ["severe spinal canal stenosis"] * 3
    loss = loss + spinemm.losses.clip_loss(model.encode_image(images), model.encode_text(texts), model.logit_scale)
    loss.backward()
    for name, param in model.named_parameters():
        in_tower = name.startswith(("vision.", "text."))
        if in_tower and ".lora_" not in name:
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad and param.grad is not None, name
    lora_grads = [p.grad.abs().sum() for n, p in model.named_parameters() if ".lora_B." in n]
    assert lora_grads and all(g > 0 for g in lora_grads)


def test_baseline_vision_is_fully_finetuned_with_lora_on_text():
    model = add_lora(_model(vision=TINY_VISION_CONFIGS["cnn"]), r=4)
    assert model.lora_config["targets"]["vision"] is None
    assert all(p.requires_grad for p in model.vision.parameters())
    assert not any(isinstance(m, LoraLayer) for m in model.vision.modules())
    summary = trainable_parameter_summary(model)
    rows = {line.split()[0]: line.split() for line in summary.splitlines()[1:]}
    assert rows["vision"][-1] == "full" and rows["text"][-1] == "lora" and rows["decoder"][-1] == "full"
    assert rows["text"][2] == rows["text"][3]  # text: trainable == LoRA parameters
    assert "% trainable" in summary.splitlines()[-1]


def test_targets_argument_forms():
    model = add_lora(_model(), r=2, targets={"vision": ["q_proj", "v_proj"], "text": None})
    names = {n.rsplit(".", 1)[-1] for n, m in model.vision.named_modules() if isinstance(m, LoraLayer)}
    assert names == {"q_proj", "v_proj"} and all(p.requires_grad for p in model.text.parameters())
    with pytest.raises(SpineModelError, match="already has LoRA"):
        add_lora(model)
    with pytest.raises(SpineModelError, match="match no module of the vision tower"):
        add_lora(_model(), targets=["query", "key", "value"])  # BERT names: nothing in the ViT
    with pytest.raises(SpineModelError, match="unknown towers"):
        add_lora(_model(), targets={"fusion": "q_proj"})
    assert add_lora(_model(vision=TIMM_VIT)).lora_config["targets"]["vision"] == TARGET_PATTERNS["timm_vit"]


def test_adapter_save_load_reproduces_outputs(tmp_path):
    base = _model()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = add_lora(base, r=4)
    _perturb_adapters(model)
    with torch.no_grad():  # fusion/heads train fully, so the adapter must carry them too
        for param in model.severity_head.parameters():
            param.add_(0.5)
    batch = probe_batch(model)
    expected = _outputs(model, batch)
    save_adapter(model, tmp_path / "adapter")
    saved = adapter_state_dict(model)
    assert set(lora_state_dict(model)) < set(saved)
    assert not any(k.startswith("vision.") and ".lora_" not in k for k in saved)  # frozen base left out

    fresh = spinemm.create_model("spine-tiny")
    fresh.load_state_dict(base_state)
    assert not torch.equal(_outputs(fresh, batch)["logits"], expected["logits"])
    load_adapter(fresh, tmp_path / "adapter")
    got = _outputs(fresh, batch)
    for key in ("logits", "loc_logits", "location"):
        assert torch.equal(got[key], expected[key]), key
    assert fresh.lora_config == model.lora_config

    wrong = add_lora(spinemm.create_model("spine-tiny"), r=8)
    with pytest.raises(SpineModelError, match="already has LoRA"):
        load_adapter(wrong, tmp_path / "adapter")
    with pytest.raises(SpineModelError, match="lacks"):
        load_adapter(spinemm.create_model("spine-tiny"), tmp_path / "nowhere")


def test_save_pretrained_of_a_lora_model_loads_back_adapter_or_merged(tmp_path):
    model = add_lora(_model(), r=4)
    _perturb_adapters(model)
    batch = probe_batch(model)
    expected = _outputs(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= \
        {p.name for p in (tmp_path / "adapter").iterdir()}
    loaded = spinemm.load_model(tmp_path / "adapter")
    assert loaded.lora_config == model.lora_config and not loaded.training
    model.save_pretrained(tmp_path / "merged", merge=True)
    merged = spinemm.load_model(tmp_path / "merged")
    assert getattr(merged, "lora_config", None) is None and not (tmp_path / "merged" / "adapter_config.json").exists()
    assert model.lora_config is not None  # merging saved a copy; the model keeps its adapters
    for got, atol in ((_outputs(loaded, batch), 0.0), (_outputs(merged, batch), 1e-5)):
        for key in ("logits", "location"):
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=atol, msg=key)
    # a pickle in the adapter's place is refused, never unpickled
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(SpineModelError, match="adapter_model.safetensors"):
        spinemm.load_model(tmp_path / "adapter")


@pytest.mark.parametrize("overrides", [{}, {"vision": {"convert_attention": False}}, {"vision": TIMM_VIT}],
                         ids=["linear-attention", "multihead-attention", "timm-vit"])
def test_merge_matches_unmerged(overrides):
    model = add_lora(_model(**overrides), r=4, alpha=8)
    _perturb_adapters(model)
    batch = probe_batch(model, num_slices=3, seed=5)
    expected = _outputs(model, batch)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert not any(".lora_" in k for k in merged.state_dict())
    assert merged.lora_config is None and all(p.requires_grad for p in merged.parameters())
    got = _outputs(merged, batch)
    assert (got["logits"] - expected["logits"]).abs().max() <= 1e-4
    assert (got["loc_logits"] - expected["loc_logits"]).abs().max() <= 1e-4
    assert not torch.allclose(expected["logits"], _outputs(_model(**overrides), batch)["logits"])


def test_failed_merge_check_is_undone():
    model = add_lora(_model(), r=4)
    _perturb_adapters(model)
    batch = probe_batch(model)
    expected = _outputs(model, batch)["logits"]
    config = copy.deepcopy(model.lora_config)
    with pytest.raises(SpineModelError, match="differs from the unmerged"):
        merge_lora(model, atol=-1.0)  # any difference at all fails: exercises the undo path
    assert config and model.lora_config == config
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(not m.merged for m in layers)
    assert torch.equal(_outputs(model, batch)["logits"], expected)


def test_lora_vision_tower_compiles_fullgraph():
    # peft's nn.MultiheadAttention path breaks torch.compile (DESIGN §6); the Linear attention must not.
    model = add_lora(_model(), r=4)
    _perturb_adapters(model)
    series = torch.rand(1, 2, 3, model.image_size, model.image_size)
    compiled = torch.compile(model.vision, backend="aot_eager", fullgraph=True)
    tokens, pooled = compiled(series)
    (tokens.sum() + pooled.sum()).backward()
    eager_tokens, _ = model.vision(series)
    assert torch.allclose(tokens, eager_tokens, atol=1e-5)
    assert all(p.grad is not None for n, p in model.vision.named_parameters() if ".lora_" in n)
