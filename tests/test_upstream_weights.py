"""``load_upstream_state_dict`` (issue 28 item 9): whatever file it is given, a SpineModelError
naming it or the tensors, and no pickle ever runs code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_safe_loading import _poison

from spinemm.errors import SpineModelError
from spinemm.models.hub import load_upstream_state_dict


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", "model.pt", "open_clip_model.safetensors"])
def test_a_pickle_that_runs_code_is_refused_naming_the_file(tmp_path, name):
    path, marker = tmp_path / name, tmp_path / "ran"
    _poison(path, marker)
    with pytest.raises(SpineModelError, match=rf"{path}: not a (checkpoint of plain tensors|valid safetensors file)"):
        load_upstream_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"PK\x03\x04truncated zip"])
def test_garbage_is_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(content)
    with pytest.raises(SpineModelError, match=rf"{path}: not a checkpoint of plain tensors"):
        load_upstream_state_dict(path)


@pytest.mark.parametrize("state", [{"w": 3}, {1: torch.zeros(1)}, [torch.zeros(1)]])
def test_a_pickle_of_anything_but_named_tensors_is_refused(tmp_path, state):
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    with pytest.raises(SpineModelError, match=rf"{path}: expected a state dict of tensors"):
        load_upstream_state_dict(path)


def test_plain_tensor_files_load(tmp_path: Path):
    weights = {"module.visual.proj": torch.arange(6.0).reshape(2, 3)}
    torch.save({"state_dict": weights}, tmp_path / "a.bin")
    save_file({"visual.proj": weights["module.visual.proj"]}, str(tmp_path / "b.safetensors"))
    for name in ("a.bin", "b.safetensors"):
        state = load_upstream_state_dict(tmp_path / name)
        assert list(state) == ["visual.proj"] and torch.equal(state["visual.proj"], weights["module.visual.proj"])
