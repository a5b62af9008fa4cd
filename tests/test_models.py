"""The model core: configs/factory, towers, attention conversion, fusion/heads, save/load, offline paths."""

from __future__ import annotations

import copy
import json
import socket
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spinemm
from spinemm.constants import TARGET_PLANE_INDEX
from spinemm.errors import SpineModelError
from spinemm.models.attention import Attention, convert_multihead_attention
from spinemm.models.factory import add_model_config, create_model, list_models, load_model
from spinemm.models.heads import decode_location
from spinemm.models.spine_clip import SpineCLIP
from spinemm.text import QUERY_TEXTS

B, S, C, H = 2, 4, 3, 32


def make_batch(seed: int = 0) -> dict:
    """A collated batch in the CONTRACTS sample format; study 1 lacks its Sagittal T2/STIR series."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, S, C, H, H, generator=g)
    plane_mask = torch.tensor([[True, True, True], [True, False, True]])
    image[~plane_mask] = 0
    return {
        "image": image,
        "plane_mask": plane_mask,
        "text": [list(QUERY_TEXTS) for _ in range(B)],
        "label": torch.randint(0, 3, (B, 25), generator=g),
        "location": torch.rand(B, 25, 3, generator=g) * torch.tensor([S, 1, 1]),
        "location_mask": torch.ones(B, 25, dtype=torch.bool),
    }


@pytest.fixture(scope="module")
def model() -> SpineCLIP:
    torch.manual_seed(0)
    return create_model("spine-tiny").eval()


@pytest.fixture()
def block_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_presets_are_listed():
    assert {"spine-tiny", "spine-vitb16-bert", "spine-biomedclip"} <= set(list_models())
    assert set(spinemm.list_models()) == set(list_models())


def test_tiny_builds_offline_and_fast(block_network):
    create_model("spine-tiny")  # warm imports; the build itself is what must be fast
    seconds = []
    for _ in range(2):  # best of two: the test machine is shared
        start = time.perf_counter()
        model = create_model("spine-tiny")
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 2.0
    assert isinstance(model, SpineCLIP) and model.config.name == "spine-tiny"
    assert model.preprocess_cfg == {
        "image_size": 32,
        "num_slices": 8,
        "channels": "2.5d",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }


def test_forward_shapes_and_ranges(model):
    batch = make_batch()
    with torch.no_grad():
        out = model(batch)
    h, w = model.vision.grid_size
    assert (h, w) == (4, 4)
    assert out["logits"].shape == (B, 25, 3)
    assert out["loc_logits"].shape == (B, 25, S, h, w)
    assert out["location"].shape == (B, 25, 3)
    assert out["location_confidence"].shape == (B, 25)
    assert out["query_embeds"].shape == (B, 25, model.config.fusion.dim)
    assert out["attn"].shape == (B, 25, S, h, w)
    loc = out["location"]
    assert ((loc[..., 0] >= 0) & (loc[..., 0] < S)).all()  # a slice position, between shown slices too
    assert ((loc[..., 1:] > 0) & (loc[..., 1:] < 1)).all()
    conf = out["location_confidence"]
    assert ((conf >= 1.0 / S - 1e-6) & (conf <= 1)).all()  # the best of S slices has at least 1/S mass
    # cross-attention: a query with its series present spreads all weight over that series' tokens;
    # a query whose series is missing reads only the learned "missing" token (no weight on patches)
    mass = out["attn"].sum(dim=(-1, -2, -3))
    present = batch["plane_mask"][:, list(TARGET_PLANE_INDEX)]
    torch.testing.assert_close(mass[present], torch.ones(int(present.sum())))
    assert torch.all(mass[~present] == 0) and (~present).sum() == 5


def test_queries_only_see_their_own_plane(model):
    plane_mask = torch.tensor([[True, True, True], [True, False, True]])
    keys = 3
    blocked = model.decoder.blocked_keys(plane_mask, keys)  # [B, 25, 3*K + 1]
    for q, plane in enumerate(TARGET_PLANE_INDEX):
        allowed = ~blocked[0, q]
        expect = torch.zeros(3 * keys + 1, dtype=torch.bool)
        expect[plane * keys : (plane + 1) * keys] = True
        assert torch.equal(allowed, expect)
        allowed = ~blocked[1, q]
        if plane == 1:  # study 1 has no Sagittal T2/STIR: only the missing token
            assert allowed.tolist() == [False] * (3 * keys) + [True]
        else:
            assert torch.equal(allowed, expect)


def test_texts_encoded_once_and_missing_series_not_encoded(model, monkeypatch):
    calls = {"text": [], "vision": []}
    text_encode, vision_forward = model.text.encode, model.vision.forward
    monkeypatch.setattr(
        model.text, "encode", lambda texts: calls["text"].append(list(texts)) or text_encode(texts)
    )
    monkeypatch.setattr(
        model.vision, "forward", lambda x: calls["vision"].append(x.shape) or vision_forward(x)
    )
    with torch.no_grad():
        model(make_batch())
    assert calls["text"] == [list(QUERY_TEXTS)]  # one call, 25 distinct texts, shared by both studies
    assert calls["vision"] == [torch.Size([5, S, C, H, H])]  # 6 series minus the missing one


def test_forward_depends_on_query_text(model):
    batch = make_batch()
    other = copy.deepcopy(batch)
    other["text"][1][0] = "an unrelated sentence about the weather"
    with torch.no_grad():
        a, b = model(batch)["logits"], model(other)["logits"]
    torch.testing.assert_close(a[0], b[0])  # study 0 unchanged
    assert not torch.allclose(a[1], b[1])


def test_backward_reaches_every_part():
    torch.manual_seed(0)
    model = create_model("spine-tiny").train()
    batch = make_batch()
    out = model(batch)
    loc_target = batch["location"][..., 0].long() * 16  # (slice, patch 0) as a flat index
    loss = F.cross_entropy(out["logits"].flatten(0, 1), batch["label"].flatten())
    loss = loss + F.cross_entropy(out["loc_logits"].flatten(2).flatten(0, 1), loc_target.flatten())
    img, txt = model.encode_image(torch.rand(3, C, H, H)), model.encode_text(["a", "b", "c"])
    loss = loss + spinemm.losses.clip_loss(img, txt, model.logit_scale)
    loss.backward()
    for name in (
        "vision.visual.conv1.weight",
        "vision.visual.transformer.resblocks.0.attn.q_proj.weight",
        "text.bert.encoder.layer.0.attention.self.query.weight",
        "text.bert.embeddings.word_embeddings.weight",
        "decoder.missing",
        "decoder.layers.0.cross_attn.k_proj.weight",
        "slice_plane.slice_pos",
        "slice_plane.plane",
        "severity_head.mlp.0.weight",
        "location_head.k_proj.weight",
        "image_proj.weight",
        "text_proj.weight",
        "logit_scale",
        "query_proj.weight",
        "token_proj.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_save_load_identical(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["preprocess_cfg"]["image_size"] == 32 and meta["model_cfg"]["name"] == "spine-tiny"
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.config == model.config
    batch = make_batch(seed=1)
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for key in ("logits", "loc_logits", "location", "attn"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    x = torch.rand(2, C, H, H)
    torch.testing.assert_close(model.encode_image(x), loaded.encode_image(x), rtol=0, atol=0)
    # same weights through create_model(name, pretrained=folder) and load_model
    for other in (
        create_model("spine-tiny", pretrained=tmp_path / "m"),
        load_model(tmp_path / "m"),
    ):
        torch.testing.assert_close(other.eval()(batch)["logits"], a["logits"], rtol=0, atol=0)


def test_pickle_weights_refused(model, tmp_path, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_cfg": model.config.to_dict()}))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for call in (
        lambda: load_model(folder),
        lambda: load_model(folder / "pytorch_model.bin"),
        lambda: create_model("spine-tiny", pretrained=folder / "pytorch_model.bin"),
    ):
        with pytest.raises(SpineModelError, match="pickle"):
            call()


def test_overrides_dotted_and_nested():
    model = create_model("spine-tiny", **{"fusion.layers": 1}, text={"layers": 1}, num_slices=6)
    assert len(model.decoder.layers) == 1 and model.text.bert.config.num_hidden_layers == 1
    assert model.config.num_slices == 6 and model.config.text.width == 64  # untouched keys survive
    with pytest.raises(SpineModelError, match="fusion.layerz"):
        create_model("spine-tiny", **{"fusion.layerz": 1})
    with pytest.raises(SpineModelError, match="unknown model"):
        create_model("no-such-model")


def test_add_model_config(tmp_path):
    config = json.loads((spinemm.models.presets.CONFIG_DIR / "spine-tiny.json").read_text())
    config["fusion"]["dim"] = 32
    (tmp_path / "my-tiny.json").write_text(json.dumps(config))
    add_model_config(tmp_path / "my-tiny.json")
    assert "my-tiny" in list_models()
    model = create_model("my-tiny")
    assert model.config.name == "my-tiny" and model.query_proj.out_features == 32
    (tmp_path / "bad.json").write_text(json.dumps({"vision": {"tpye": "open_clip"}}))
    with pytest.raises(SpineModelError, match="vision.tpye"):
        add_model_config(tmp_path / "bad.json")


def test_image_size_mismatch_is_a_clear_error(model):
    batch = make_batch()
    batch["image"] = torch.rand(B, 3, S, C, 48, 48)
    with pytest.raises(SpineModelError, match="48"):
        model(batch)


@pytest.mark.parametrize(
    "name, repos, files",
    [
        (
            "spine-biomedclip",
            [
                "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
            ],
            ["open_clip_config.json", "open_clip_pytorch_model.bin", "vocab.txt", "config.json"],
        ),
        (
            "spine-vitb16-bert",
            ["timm/vit_base_patch16_clip_224.openai", "bert-base-uncased"],
            ["open_clip_pytorch_model.bin", "config.json", "pytorch_model.bin", "vocab.txt"],
        ),
    ],
)
def test_offline_error_names_what_to_download(name, repos, files, tmp_path, monkeypatch, block_network):
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(SpineModelError) as info:
        create_model(name)
    message = str(info.value)
    for repo in repos:
        assert f"hf download {repo} " in message
        assert str(cache / f"models--{repo.replace('/', '--')}" / "snapshots") in message
    for file in files:
        assert file in message


def test_attention_module_matches_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    attn = Attention.from_multihead(mha).eval()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    blocked = torch.rand(5, 7) > 0.6
    blocked[:, 0] = False  # every query keeps one key
    ref, ref_w = mha(q, kv, kv, attn_mask=blocked, need_weights=True)
    out, w = attn(q, kv, kv, attn_mask=blocked, need_weights=True)
    fast, _ = attn(q, kv, kv, attn_mask=blocked)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)


def test_vit_conversion_keeps_outputs():
    from open_clip.model import _build_vision_tower

    torch.manual_seed(0)
    visual = _build_vision_tower(
        16, {"width": 64, "layers": 2, "head_width": 16, "patch_size": 8, "image_size": 32}
    )
    visual.eval()
    converted = copy.deepcopy(visual)
    assert convert_multihead_attention(converted) == 2
    assert not any(isinstance(m, nn.MultiheadAttention) for m in converted.modules())
    attn = converted.transformer.resblocks[0].attn
    assert all(type(getattr(attn, n)) is nn.Linear for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), visual(x), atol=1e-5, rtol=1e-5)


def test_decode_location():
    logits = torch.full((1, 1, 3, 2, 4), -1e4)
    logits[0, 0, 2, 1, 3] = 0.0  # all mass on slice 2, row 1, column 3
    location, confidence = decode_location(logits)
    torch.testing.assert_close(location[0, 0], torch.tensor([2.0, 3.5 / 4, 1.5 / 2]))
    torch.testing.assert_close(confidence[0, 0], torch.tensor(1.0))
    uniform = decode_location(torch.zeros(2, 3, 4, 2, 2))
    torch.testing.assert_close(uniform[0][..., 1:], torch.full((2, 3, 2), 0.5))
    torch.testing.assert_close(uniform[1], torch.full((2, 3), 0.25))


# ------------------------------------------------------------- real-preset loading code, on local files
def fake_biomedclip(root):
    """A BiomedCLIP-shaped open_clip model (timm ViT + HF BERT, mlp text projection), saved the way the
    hub repo is laid out: open_clip_config.json + open_clip_model.safetensors + tokenizer files."""
    from open_clip import CustomTextCLIP
    from safetensors.torch import save_file
    from transformers import BertConfig

    from spinemm.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    bert_dir, repo = root / "bert", root / "biomedclip"
    BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ).save_pretrained(bert_dir)
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": str(bert_dir),
            "hf_tokenizer_name": str(bert_dir),
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 64,
        },
    }
    torch.manual_seed(1)
    build_cfg = copy.deepcopy(model_cfg)
    build_cfg["text_cfg"]["hf_model_pretrained"] = False  # a random BERT from its config
    reference = CustomTextCLIP(**build_cfg, init_logit_scale=3.0).eval()
    repo.mkdir()
    mean, std = [0.4, 0.45, 0.5], [0.25, 0.26, 0.27]
    (repo / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {"mean": mean, "std": std}})
    )
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()}, repo / "open_clip_model.safetensors"
    )
    tokenizer.save_pretrained(repo)
    return reference, tokenizer, repo, bert_dir, (mean, std)


def test_open_clip_hub_model_keeps_its_alignment(tmp_path, block_network):
    reference, tokenizer, repo, bert_dir, (mean, std) = fake_biomedclip(tmp_path)
    overrides = {
        "embed_dim": 16,
        "vision.pretrained": str(repo),
        "text.open_clip_model": str(repo),
        "text.hf_model_name": str(bert_dir),
        "fusion.dim": 32,
        "fusion.heads": 4,
        "fusion.loc_dim": 16,
    }
    model = create_model("spine-biomedclip", **overrides).eval()
    assert model.preprocess_cfg["mean"] == mean and model.vision.grid_size == (14, 14)
    assert model.logit_scale.item() == pytest.approx(3.0)
    x = torch.rand(2, 3, 224, 224)
    texts = ["lumbar spine MRI", "severe spinal canal stenosis at L4/L5"]
    ids = tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]
    normalized = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(x), reference.encode_image(normalized), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(model.encode_text(texts), reference.encode_text(ids), atol=1e-5, rtol=1e-4)
        tokens, pooled = model.vision(x[:, None])
    assert tokens.shape == (2, 1, 196, 192) and pooled.shape == (2, 1, 192)
    # the saved folder rebuilds with no upstream files at all
    model.save_pretrained(tmp_path / "saved")
    for path in (repo, bert_dir):
        for f in path.iterdir():
            f.unlink()
    loaded = load_model(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(texts), model.encode_text(texts), rtol=0, atol=0)


def test_builtin_open_clip_name_with_local_weights(tmp_path, block_network):
    import open_clip
    from open_clip.model import _build_vision_tower
    from safetensors.torch import save_file

    torch.manual_seed(2)
    vision_cfg = open_clip.get_model_config("ViT-S-32")["vision_cfg"]
    reference = _build_vision_tower(384, vision_cfg).eval()
    save_file(
        {f"visual.{k}": v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "w.safetensors"
    )
    overrides = {
        "embed_dim": 384,
        "vision.model_name": "ViT-S-32",
        "vision.pretrained": str(tmp_path / "w.safetensors"),
        "vision.open_clip_cfg": None,
        "vision.mean": None,
        "vision.std": None,
    }
    model = create_model("spine-tiny", **overrides, **{"vision.image_size": 224}).eval()
    x = torch.rand(2, 3, 224, 224)
    mean, std = (
        torch.tensor(model.vision.image_mean).view(3, 1, 1),
        torch.tensor(model.vision.image_std).view(3, 1, 1),
    )
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), reference((x - mean) / std), atol=1e-5, rtol=1e-4)
    # another image size: the position embedding is resampled, and the tower runs at 64 px
    small = create_model("spine-tiny", **overrides, **{"vision.image_size": 64})
    assert small.vision.grid_size == (2, 2) and small.encode_image(torch.rand(1, 3, 64, 64)).shape == (1, 384)
    with pytest.raises(SpineModelError, match="neither an open_clip tag"):
        create_model("spine-tiny", **{**overrides, "vision.pretrained": "no-such-tag"})


def test_timm_cnn_tower_tokens():
    model = create_model(
        "spine-tiny",
        vision={
            "type": "timm",
            "model_name": "resnet18",
            "open_clip_cfg": None,
            "image_size": 64,
            "mean": None,
            "std": None,
        },
    )
    tokens, pooled = model.vision(torch.rand(2, 3, 3, 64, 64))
    assert model.vision.grid_size == (2, 2)
    assert tokens.shape == (2, 3, 4, 512) and pooled.shape == (2, 3, 512)
    torch.testing.assert_close(pooled, tokens.mean(dim=2))  # resnet's average pool over the same map


def test_converted_tower_takes_lora_on_linears_and_compiles_whole():
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear as LoraLinear

    model = create_model("spine-tiny").eval()
    targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    inject_adapter_in_model(LoraConfig(r=4, target_modules=targets, init_lora_weights=False), model.vision)
    adapted = [n for n, m in model.vision.named_modules() if isinstance(m, LoraLinear)]
    assert len(adapted) == 2 * len(targets)  # 2 blocks x 4 plain Linear projections
    x = torch.rand(2, 2, C, H, H)
    compiled = torch.compile(model.vision, fullgraph=True, backend="aot_eager")  # a graph break would raise
    with torch.no_grad():
        for got, want in zip(compiled(x), model.vision(x), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_hub_cache_is_read_offline(tmp_path, monkeypatch, block_network):
    from spinemm.models.hub import resolve_files
    from spinemm.models.vision import OPEN_CLIP_WEIGHTS

    repo_dir = tmp_path / "hub" / "models--org--repo"
    snapshot = repo_dir / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("abc123")
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    (snapshot / "open_clip_config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    found = resolve_files(
        "org/repo", ["open_clip_config.json", OPEN_CLIP_WEIGHTS], setting="vision.pretrained"
    )
    # the safetensors alternative is absent, so the cached pickle name stands in for it
    assert found == {
        "open_clip_config.json": snapshot / "open_clip_config.json",
        "open_clip_model.safetensors": snapshot / "open_clip_pytorch_model.bin",
    }
    with pytest.raises(SpineModelError, match="neither a local path nor a hub repo id"):
        resolve_files("not a repo//id", ["x"], setting="vision.pretrained")


def test_removed_roi_crop_option_is_refused_by_name():
    from spinemm.models.config import ModelConfig

    with pytest.raises(SpineModelError, match="roi_crop was removed"):
        ModelConfig.from_dict({"fusion": {"roi_crop": 0.25}})
    # an old config that had it off (the default) still loads
    assert ModelConfig.from_dict({"fusion": {"roi_crop": 0.0, "roi_jitter": 0.03}}).fusion.layers == 2
