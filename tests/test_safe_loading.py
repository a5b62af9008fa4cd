"""Refused or corrupt weights and state files give SpineModelError naming the file (issue 14), and a
resume restores every saved state or fails: nothing is skipped with only a log line."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from spinemm.errors import SpineModelError
from spinemm.training import checkpoint as ckpt_mod


class _Payload:
    """Unpickling this runs ``os.system``: a stand-in for a poisoned file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison(path: Path, marker: Path) -> None:
    torch.save({"state": _Payload(marker)}, path)


# --- load_model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    from spinemm.models.factory import create_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("saved") / "model"
    create_model("spine-tiny").save_pretrained(folder)
    return folder


def _copy(saved: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(saved, tmp_path / "model"))


def test_pickle_renamed_to_safetensors_is_refused(saved_model, tmp_path):
    from spinemm.models.factory import load_model

    folder = _copy(saved_model, tmp_path)
    marker = tmp_path / "ran"
    _poison(folder / "model.safetensors", marker)
    with pytest.raises(SpineModelError, match=r"model\.safetensors: not a valid safetensors file"):
        load_model(folder)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors_is_refused(saved_model, tmp_path, damage):
    from spinemm.models.factory import load_model

    folder = _copy(saved_model, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"{ not json" + data[18:])
    with pytest.raises(SpineModelError, match=rf"{weights}: not a valid safetensors file"):
        load_model(folder)


def test_corrupt_config_is_refused(saved_model, tmp_path):
    from spinemm.models.factory import load_model

    folder = _copy(saved_model, tmp_path)
    config = folder / "config.json"
    config.write_text(config.read_text()[:-20])
    with pytest.raises(SpineModelError, match=rf"{config}: not a valid JSON file"):
        load_model(folder)


def test_malformed_tokenizer_is_refused(saved_model, tmp_path):
    """Found by the fuzz: valid JSON that the tokenizers library refuses with a bare Exception."""
    from spinemm.models.factory import load_model

    folder = _copy(saved_model, tmp_path)
    tokenizer = folder / "tokenizer.json"
    data = json.loads(tokenizer.read_text())
    data["normalizer"] = {"type": "NoSuchNormalizer"}
    tokenizer.write_text(json.dumps(data))
    with pytest.raises(SpineModelError, match=rf"{folder}: cannot load the tokenizer files"):
        load_model(folder)


def test_non_finite_weights_name_the_file_and_tensor(saved_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from spinemm.models.factory import load_model

    folder = _copy(saved_model, tmp_path)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name][..., 0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(SpineModelError, match=rf"{weights}: tensor '{name}' holds NaN or inf"):
        load_model(folder)


@pytest.mark.parametrize(("change", "words"), [
    ({"fusion": {"layers": 100_000}}, "fusion.layers = 100000 is outside 0..64"),
    ({"vision": {"image_size": 10**9}}, "vision.image_size"),
    ({"embed_dim": 10**7}, "embed_dim = 10000000"),
    ({"text": {"max_length": 10**9}}, "text.max_length"),
    ({"roi_side_mm": -60}, "roi_side_mm = -60"),
    ({"fusion": {"dropout": "abc"}}, "fusion.dropout must be float"),
])
def test_model_config_sizes_are_refused_before_anything_is_built(saved_model, tmp_path, change, words):
    import time

    from spinemm.models.factory import load_model

    folder = _copy(saved_model, tmp_path)
    config = folder / "config.json"
    meta = json.loads(config.read_text())
    for key, value in change.items():
        if isinstance(value, dict):
            meta["model_cfg"][key].update(value)
        else:
            meta["model_cfg"][key] = value
    config.write_text(json.dumps(meta))
    start = time.perf_counter()
    with pytest.raises(SpineModelError, match=re.escape(words)):
        load_model(folder)
    assert time.perf_counter() - start < 5  # refused, not allocated
    from spinemm.models.config import BOUNDS

    assert BOUNDS["FusionConfig.layers"] == (0, 64)  # the bound the first case names


# --- pipeline.json ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory) -> Path:
    from spinemm.models.config import GraderConfig, LocatorConfig
    from spinemm.models.factory import create_model
    from spinemm.pipeline import GradeStage, LocateStage, SpinePipeline

    torch.manual_seed(0)
    detect = create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32})
    grade = GradeStage(GraderConfig(backbone="cnn", size=16, channels=(8, 16)), query_dim=detect.config.fusion.dim)
    folder = tmp_path_factory.mktemp("pipeline") / "pipeline"
    SpinePipeline(detect, LocateStage(LocatorConfig(size=32, channels=(8, 16, 16))), grade).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("edit", "words"), [
    (lambda meta: "not json {", "not valid JSON"),
    (lambda meta: [1, 2], "must hold a JSON object, got list"),
    (lambda meta: {**meta, "stages": "detect"}, "stages must be a list"),
    (lambda meta: {**meta, "locate": {**meta["locate"], "size": "abc"}}, "locate.size must be int"),
    (lambda meta: {**meta, "locate": {**meta["locate"], "channels": [-4]}}, "locate.channels = (-4,) is outside"),
    (lambda meta: {**meta, "locate": {**meta["locate"], "channels": ["abc"]}}, "locate: bad LocatorConfig"),
    (lambda meta: {**meta, "grade": {**meta["grade"], "query_dim": "abc"}}, "grade.query_dim must be an integer"),
    (lambda meta: {**meta, "grade": {**meta["grade"], "query_dim": 10**9}}, "grade.query_dim must be an integer"),
    (lambda meta: {**meta, "grade": {**meta["grade"], "backbone": "resnet9000"}}, "grade: "),
    (lambda meta: {**meta, "grade": 7}, "grade must be a mapping"),
])
def test_a_bad_pipeline_json_names_file_and_key(saved_pipeline, tmp_path, edit, words):
    import shutil

    from spinemm.pipeline import load_pipeline

    folder = Path(shutil.copytree(saved_pipeline, tmp_path / "pipeline"))
    path = folder / "pipeline.json"
    meta = edit(json.loads(path.read_text()))
    path.write_text(meta if isinstance(meta, str) else json.dumps(meta))
    with pytest.raises(SpineModelError) as err:
        load_pipeline(folder)
    assert str(path) in str(err.value) and words in str(err.value), str(err.value)


def test_non_finite_stage_weights_are_named(saved_pipeline, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from spinemm.pipeline import load_pipeline

    folder = Path(shutil.copytree(saved_pipeline, tmp_path / "pipeline"))
    weights = folder / "locate.safetensors"
    state = load_file(str(weights))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].fill_(float("inf"))
    save_file(state, str(weights))
    with pytest.raises(SpineModelError, match=rf"{weights}: tensor '{name}' holds NaN or inf"):
        load_pipeline(folder)


# --- resume ----------------------------------------------------------------------------------------


def _accelerator(tmp_path: Path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def _step(model, optimizer, scheduler) -> None:
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    accelerator, model, optimizer, scheduler = _accelerator(tmp_path / "run")
    _step(model, optimizer, scheduler)
    return ckpt_mod.save_checkpoint(accelerator, tmp_path / "run", 1, {"epoch": 0})


def _draw() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_resume_restores_weights_optimizer_scheduler_and_every_rng(tmp_path):
    accelerator, model, optimizer, scheduler = _accelerator(tmp_path / "run")
    _step(model, optimizer, scheduler)
    saved = ckpt_mod.save_checkpoint(accelerator, tmp_path / "run", 1, {"epoch": 0})
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    next_draws = _draw()  # what the saved process draws next

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    accelerator, model, optimizer, scheduler = _accelerator(tmp_path / "fresh")
    scrambled = _draw()
    state = ckpt_mod.load_checkpoint(accelerator, saved)
    assert state == {"step": 1, "epoch": 0}
    assert _draw() == next_draws != scrambled
    assert scheduler.get_last_lr() == [0.05] and optimizer.state_dict()["state"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_poisoned_state_file_is_named_and_never_run(tmp_path, checkpoint, name):
    marker = tmp_path / "ran"
    _poison(checkpoint / name, marker)
    accelerator, *_ = _accelerator(tmp_path / "fresh")
    with pytest.raises(SpineModelError, match=str(checkpoint / name)):
        ckpt_mod.load_checkpoint(accelerator, ckpt_mod.resolve_resume("latest", checkpoint.parent))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "model.safetensors"])
def test_missing_or_truncated_state_file_is_named(tmp_path, checkpoint, name):
    accelerator, *_ = _accelerator(tmp_path / "fresh")
    target = checkpoint / name
    target.write_bytes(target.read_bytes()[:40])
    with pytest.raises(SpineModelError, match=str(target)):
        ckpt_mod.load_checkpoint(accelerator, checkpoint)
    target.unlink()
    with pytest.raises(SpineModelError, match=str(target)):
        ckpt_mod.load_checkpoint(accelerator, checkpoint)


def test_rng_state_of_the_wrong_form_is_refused(tmp_path, checkpoint):
    torch.save({"random_state": "not a state"}, checkpoint / "random_states_0.pkl")
    accelerator, *_ = _accelerator(tmp_path / "fresh")
    with pytest.raises(SpineModelError, match=r"random_states_0\.pkl: cannot restore the RNG states"):
        ckpt_mod.load_checkpoint(accelerator, checkpoint)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"epoch": 0}', "\udcff"])
def test_corrupt_trainer_state_is_named(tmp_path, checkpoint, text):
    state = checkpoint / ckpt_mod.STATE_FILE
    if text == "\udcff":
        state.write_bytes(b"\xff\xfe{")
    else:
        state.write_text(text)
    accelerator, *_ = _accelerator(tmp_path / "fresh")
    with pytest.raises(SpineModelError, match=str(state)):
        ckpt_mod.load_checkpoint(accelerator, checkpoint)


def test_poison_really_runs_when_unpickled(tmp_path):
    """The payload above is live: plain unpickling would run it (so the tests above can fail)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
