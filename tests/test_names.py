"""Model names resolve one way everywhere (Python, CLI, recipes); no network fails in seconds, truthfully."""

from __future__ import annotations

import socket
import time

import pandas as pd
import pytest
import torch

import spinemm
from spinemm.cli import main
from spinemm.errors import SpineModelError


@pytest.fixture()
def no_network(monkeypatch):
    """The network is down (name lookups fail, as on a machine without DNS) and HF_HUB_OFFLINE is
    *not* set, so the loader has to find out for itself."""

    def dead(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", dead)
    monkeypatch.setattr(socket, "getaddrinfo", dead)
    monkeypatch.setattr(socket.socket, "connect", dead)


def fake_hub_cache(cache, repo: str, saved_folder_writer) -> None:
    """A hub cache holding ``repo`` (the layout huggingface_hub writes), as a download left it."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("0" * 40)
    saved_folder_writer(repo_dir / "snapshots" / ("0" * 40))


def test_names_are_classified_without_network(tmp_path, no_network):
    from spinemm.models.names import parse_model_name

    model_dir = spinemm.create_model("spine-tiny").save_pretrained(tmp_path / "m")
    assert parse_model_name("spine-tiny").kind == "preset"
    assert parse_model_name("hf-hub:org/name").target == "org/name"
    assert parse_model_name(model_dir).kind == "folder"
    assert parse_model_name(str(model_dir / "model.safetensors")).kind == "file"
    with pytest.raises(SpineModelError, match="unknown model 'spine-tinyy'.*not a preset"):
        parse_model_name("spine-tinyy")
    with pytest.raises(SpineModelError, match="for a hub repo write hf-hub:org/name"):
        parse_model_name("org/name")  # a bare org/name is never sent to the network


def test_cli_predict_accepts_a_preset_name(phantom_root, tmp_path, capsys, no_network):
    start = time.perf_counter()
    code = main(["predict", "--model", "spine-tiny", "--data", str(phantom_root), "--out", str(tmp_path / "p")])
    assert code == 0, capsys.readouterr().err
    submission = pd.read_csv(tmp_path / "p" / "submission.csv")
    assert len(submission) == 3 * 25  # the phantom's three test studies
    assert "untrained" in capsys.readouterr().err  # a preset's heads are random: said, not hidden
    assert time.perf_counter() - start < 120


@pytest.mark.timeout(120)
@pytest.mark.parametrize("call", [
    lambda: spinemm.load_model("hf-hub:org/spine-model"),
    lambda: spinemm.load_pipeline("hf-hub:org/spine-model"),
    lambda: spinemm.create_model("spine-biomedclip"),  # upstream tower files, per-file resolution
], ids=["load_model", "load_pipeline", "preset-with-upstream-towers"])
def test_unreachable_hub_fails_in_seconds_and_says_why(call, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(SpineModelError) as info:
        call()
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "cannot reach https://huggingface.co" in message and "Name or service not known" in message
    assert "HF_HUB_OFFLINE" not in message  # it was not set: the message must not claim it was
    assert "hf download " in message and str(tmp_path / "empty-cache") in message


def test_offline_setting_is_named_when_it_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SpineModelError, match="(?s)HF_HUB_OFFLINE=1 is set.*hf download org/spine-model"):
        spinemm.load_model("hf-hub:org/spine-model")


def test_hf_hub_name_reads_the_hub_cache_offline(tmp_path, monkeypatch, no_network):
    torch.manual_seed(0)
    model = spinemm.create_model("spine-tiny").eval()
    fake_hub_cache(tmp_path / "cache", "org/spine-tiny-trained", model.save_pretrained)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    x = torch.rand(2, 3, 32, 32)
    for loaded in (spinemm.load_model("hf-hub:org/spine-tiny-trained"),
                   spinemm.create_model("hf-hub:org/spine-tiny-trained"),
                   spinemm.create_model("spine-tiny", pretrained="hf-hub:org/spine-tiny-trained"),
                   spinemm.load_pipeline("hf-hub:org/spine-tiny-trained").detect.model):
        torch.testing.assert_close(loaded.eval().encode_image(x), model.encode_image(x), rtol=0, atol=0)


def test_recipe_init_from_takes_any_model_name(tmp_path, no_network):
    from spinemm.training.common import build_model
    from spinemm.training.config import load_config

    config = load_config({"init_from": "spine-tiny"})
    assert build_model(config).config.name == "spine-tiny"


def test_load_model_points_a_pipeline_folder_at_load_pipeline(tmp_path):
    pipeline = spinemm.SpinePipeline(spinemm.create_model("spine-tiny"))
    pipeline.save_pretrained(tmp_path / "pipe")
    with pytest.raises(SpineModelError, match="pipeline folder.*load_pipeline"):
        spinemm.load_model(tmp_path / "pipe")
    assert spinemm.load_pipeline(tmp_path / "pipe").stage_names == ["detect"]


def test_loading_returns_eval_mode_and_from_pretrained_takes_the_transformers_keywords(tmp_path, monkeypatch):
    from spinemm.models.spine_clip import SpineCLIP

    torch.manual_seed(0)
    model = spinemm.create_model("spine-tiny", **{"text.layers": 1})
    model.save_pretrained(tmp_path / "m")
    for loaded in (spinemm.load_model(tmp_path / "m"), SpineCLIP.from_pretrained(tmp_path / "m"),
                   spinemm.load_pipeline(tmp_path / "m").detect.model):
        assert not loaded.training and not any(m.training for m in loaded.modules())
        first, again = loaded.encode_text(["spinal canal stenosis"]), loaded.encode_text(["spinal canal stenosis"])
        torch.testing.assert_close(first, again, rtol=0, atol=0)  # dropout is off
    half = SpineCLIP.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and not half.training
    with pytest.raises(SpineModelError, match="unknown key 'revison'; did you mean 'revision'"):
        SpineCLIP.from_pretrained(tmp_path / "m", revison="main")
    with pytest.raises(SpineModelError, match="revision='v1' needs a hub name"):
        SpineCLIP.from_pretrained(tmp_path / "m", revision="v1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SpineModelError, match="(?s)at revision v1.*hf download org/m --revision v1"):
        SpineCLIP.from_pretrained("hf-hub:org/m", revision="v1")
