"""The training engine: config overrides, atomic checkpoints, a tiny severity run and exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import spinemm
from spinemm.errors import SpineModelError
from spinemm.training import checkpoint as ckpt_mod
from spinemm.training import (
    config_from_argv,
    latest_checkpoint,
    list_checkpoints,
    load_config,
    train_detect,
)

# The smallest settings that still exercise every path: 6 train + 2 val studies, 4 slices, 32 px.
TINY = [
    "data.num_slices=4", "data.image_size=32", "data.batch_size=2", "data.phantom=null",
    "split.val_fraction=0.25", "train.epochs=2", "optim.lr=2e-3", "checkpoint.every_steps=2",
    "checkpoint.keep_last=3", "log.progress=false", "log.tensorboard=false", "model.name=spine-tiny",
    # dropout draws from the global RNG and augmentation from per-sample generators: resume must
    # restore both streams exactly
    "model.kwargs={fusion.dropout: 0.1}", "data.augment=true",
]


def _run(root: Path, out: Path, *extra: str) -> dict:
    return train_detect(None, [f"data.root={root}", f"output_dir={out}", *TINY, *extra])


# ------------------------------------------------------------------------------------------ config


def test_config_override_forms_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\noptim:\n  lr: 0.01\ndata:\n  phantom: {n_studies: 5}\n")
    config = config_from_argv(["--config", str(path), "optim.lr=1e-4", "--train.epochs", "7",
                               "--data.batch_size=3", "model.kwargs={text.type: none}", "--resume", "latest",
                               "data.phantom.seed=2", "--output-dir", "out"])
    assert config["optim"]["lr"] == pytest.approx(1e-4) and isinstance(config["optim"]["lr"], float)
    assert config["train"]["epochs"] == 7 and config["data"]["batch_size"] == 3
    assert config["model"]["kwargs"] == {"text.type": "none"}
    assert config["resume"] == "latest" and config["output_dir"] == "out"
    assert config["data"]["phantom"] == {"n_studies": 5, "seed": 2}  # YAML value, then a nested override
    assert config["optim"]["weight_decay"] == 0.05  # untouched defaults stay
    assert load_config(None, ["optim.lr=1"])["optim"]["lr"] == 1.0  # an int where a float is expected
    with pytest.raises(SpineModelError, match="did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=1"])
    path.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(SpineModelError, match="trian"):
        load_config(path)
    with pytest.raises(SpineModelError, match="needs a value"):
        config_from_argv(["--train.epochs"])
    with pytest.raises(SpineModelError, match="true or false"):
        load_config(None, ["log.progress=maybe"])
    with pytest.raises(SpineModelError, match="'train.epochs' must be an integer, got 'abc'"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(SpineModelError, match="'optim.lr' must be a number"):
        load_config(None, ["optim.lr=fast"])
    assert load_config(None, ["train.epochs=1e1"])["train"]["epochs"] == 10  # a whole float for an int


def test_a_data_root_given_alone_never_becomes_a_phantom(tmp_path):
    from types import SimpleNamespace

    from spinemm.errors import SpineDataError
    from spinemm.training.common import prepare_root

    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  root: {tmp_path / 'p'}\n  phantom: {{n_studies: 3, n_test: 1, image_size: 32}}\n")
    assert load_config(path)["data"]["phantom"]  # the config asks for a phantom beside its root
    typo = tmp_path / "rsna-typo"
    config = load_config(path, [f"data.root={typo}"])
    assert config["data"]["phantom"] is None  # the YAML's phantom was for the YAML's root
    main = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    with pytest.raises(SpineDataError, match=f"{typo}/train.csv does not exist"):
        prepare_root(config, main)
    assert not typo.exists()  # nothing written there
    both = load_config(path, [f"data.root={typo}", "data.phantom.seed=1"])
    assert both["data"]["phantom"]["seed"] == 1  # asked for together: a phantom is written there


# -------------------------------------------------------------------------------------- checkpoint


def _toy_accelerator(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _train_step(model, optimizer):
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    accelerator, model, optimizer = _toy_accelerator(tmp_path)
    _train_step(model, optimizer)
    first = ckpt_mod.save_checkpoint(accelerator, tmp_path, 1, {"epoch": 0}, keep_last=2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, optimizer)

    def killed(tmp: Path, final: Path) -> None:  # the process dies after writing, before the rename
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(ckpt_mod, "_commit", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.save_checkpoint(accelerator, tmp_path, 2, {"epoch": 0}, keep_last=2)
    tmp = tmp_path / "checkpoint-2.tmp"
    assert (tmp / "model.safetensors").is_file() and (tmp / ckpt_mod.STATE_FILE).is_file()
    assert list_checkpoints(tmp_path) == [first] and latest_checkpoint(tmp_path) == first

    state = ckpt_mod.load_checkpoint(accelerator, ckpt_mod.resolve_resume("latest", tmp_path))
    assert state == {"step": 1, "epoch": 0}
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    monkeypatch.undo()
    ckpt_mod.save_checkpoint(accelerator, tmp_path, 3, {"epoch": 0}, keep_last=1)
    assert not tmp.exists()  # the stale half-written folder is swept by the next save
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    with pytest.raises(SpineModelError, match="not a complete checkpoint"):
        ckpt_mod.resolve_resume(tmp_path / "checkpoint-9", tmp_path)


# ------------------------------------------------------------------------------------- severity run


def test_resume_knows_its_run_and_keep_last_keeps_the_newest_writes(tmp_path):
    accelerator, model, optimizer = _toy_accelerator(tmp_path)
    config = load_config(None, ["train.epochs=3"])
    settings = ckpt_mod.run_settings(config)
    assert "train.epochs" in settings and "data.num_workers" not in settings and "log.progress" not in settings
    assert ckpt_mod.resolve_resume(None, tmp_path, settings) is None  # an empty folder: a fresh start
    said = []
    assert ckpt_mod.resolve_resume("latest", tmp_path, settings, say=said.append) is None
    assert said == [f"resume=latest: no checkpoint in {tmp_path}; starting a new run"]
    for step in (15, 20):  # an earlier run, further along
        ckpt_mod.save_checkpoint(accelerator, tmp_path, step, {"run_settings": settings}, keep_last=2)
    other = ckpt_mod.run_settings(load_config(None, ["train.epochs=1", "optim.lr=1e-4"]))
    with pytest.raises(SpineModelError, match=r"checkpoint-20 was written by a run with other settings "
                                              r"\(optim.lr 0.0003 -> 0.0001, train.epochs 3 -> 1\): resume=force"):
        ckpt_mod.resolve_resume("latest", tmp_path, other)
    assert ckpt_mod.resolve_resume("force", tmp_path, other).name == "checkpoint-20"
    assert ckpt_mod.resolve_resume("latest", tmp_path, settings).name == "checkpoint-20"  # the same run resumes
    with pytest.raises(SpineModelError, match="holds checkpoints of an earlier run.*checkpoint.overwrite=true"):
        ckpt_mod.resolve_resume(None, tmp_path, other)
    # told to overwrite, the old run's checkpoints go before the new run writes any
    assert ckpt_mod.resolve_resume(None, tmp_path, other, overwrite=True) is None
    assert list_checkpoints(tmp_path) == []
    # keep_last keeps the newest by write order, even when an older run left a higher step
    for step in (30, 1, 2):
        ckpt_mod.save_checkpoint(accelerator, tmp_path, step, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]


@pytest.fixture(scope="module")
def full_run(phantom_root, tmp_path_factory):
    """The uninterrupted reference run: 2 epochs x 3 steps."""
    out = tmp_path_factory.mktemp("full")
    return _run(phantom_root, out, "log.tensorboard=true"), out


def test_the_model_card_says_what_the_model_was_trained_on(full_run):
    result, out = full_run
    card = (out / "model" / "README.md").read_text()
    head = card.split("## Use")[0]
    assert "synthetic phantom, not on MRI of people" in head  # said first, not only among the caveats
    assert "training and 2 validation studies of `" in card and "seed 0" in card
    assert "Not recorded" not in card and "None recorded" not in card
    assert f"| score | {round(result['metrics']['score'], 4)} |" in card
    assert "| phantom prior-only score |" in card and "| phantom oracle score |" in card
    assert "Not for\nclinical use" in card and "## Base towers\n\nvision: open_clip" in card


def test_train_detect_outputs(full_run, phantom_root):
    result, out = full_run
    assert result["stopped"] is False and result["state"].step == 6 and result["num_processes"] == 1
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert load_config(out / "config.yaml")["output_dir"] == str(out)  # the resolved config, re-loadable

    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert math.isfinite(metrics["metrics"]["score"]) and metrics["metrics"]["score"] > 0
    assert "macro_recall" in metrics["metrics"]
    assert metrics["best"]["score"] == min(h["score"] for h in metrics["history"])

    # the val predictions rescore to the metrics' official score
    sub = pd.read_csv(out / "val_submission.csv")
    sol = pd.read_csv(out / "val_solution.csv")
    assert len(sub) == 25 * metrics["val_studies"]
    np.testing.assert_allclose(sub[["normal_mild", "moderate", "severe"]].sum(axis=1), 1.0, atol=1e-5)
    assert spinemm.metrics.rsna_score(sol, sub) == pytest.approx(metrics["metrics"]["score"], rel=1e-5)
    # accuracy recomputed by hand: argmax of the saved probabilities vs the one-hot solution rows
    columns = ["normal_mild", "moderate", "severe"]
    joined = sol.merge(sub, on="row_id", suffixes=("_true", "_pred"))
    assert len(joined) == len(sol)
    hits = (joined[[f"{c}_pred" for c in columns]].to_numpy().argmax(1)
            == joined[[f"{c}_true" for c in columns]].to_numpy().argmax(1))
    assert metrics["metrics"]["accuracy"] == pytest.approx(hits.mean(), abs=1e-9)
    assert len(pd.read_csv(out / "val_locations.csv")) == 25 * metrics["val_studies"]

    model = spinemm.load_model(out / "model")
    assert model.preprocess_cfg["num_slices"] == 4 and model.preprocess_cfg["image_size"] == 32
    weights = load_file(str(out / "model" / "model.safetensors"))
    final = load_file(str(out / "checkpoint-6" / "model.safetensors"))
    assert all(torch.equal(weights[k], final[k]) for k in final)  # the model dir is the final state
    assert any((out / "tensorboard").rglob("events.out.tfevents*"))

    # evaluate_model() on its own, on a plain DataLoader, reproduces the run's final val metrics
    from torch.utils.data import DataLoader

    from spinemm.data import SpineDataset, collate, load_tables
    from spinemm.training import evaluate_model
    from spinemm.training.common import split_studies

    _, val_ids = split_studies(load_tables(phantom_root), load_config(out / "config.yaml"))
    dataset = SpineDataset(phantom_root, study_ids=val_ids, num_slices=4, image_size=32)
    evaluated = evaluate_model(model, DataLoader(dataset, batch_size=2, collate_fn=collate))
    assert evaluated["probs"].shape == (len(val_ids), 25, 3) and evaluated["labels"].shape == (len(val_ids), 25)
    assert evaluated["location"].shape == (len(val_ids), 25, 3)
    assert evaluated["metrics"]["score"] == pytest.approx(metrics["metrics"]["score"], abs=1e-5)
    assert evaluated["metrics"]["accuracy"] == pytest.approx(metrics["metrics"]["accuracy"])
    # the saved best model re-scores to the best epoch's score (not just "it loads")
    best = evaluate_model(spinemm.load_model(out / "best"), DataLoader(dataset, batch_size=2, collate_fn=collate))
    assert best["metrics"]["score"] == pytest.approx(metrics["best"]["score"], abs=1e-5)


def test_selection_score_is_the_mean_of_the_last_evaluations():
    from spinemm.training.engine import selection_score

    history = [{"score": 0.9}, {"score": 0.5}, {"score": math.nan}, {"score": 0.7}]
    assert selection_score(history[:2], 1) == 0.5
    assert selection_score(history[:2], 3) == pytest.approx(0.7)  # fewer evaluations at the start
    assert selection_score(history[:3], 3) is None  # the evaluation that ends it has no score
    assert selection_score(history, 3) == pytest.approx(0.6)  # a NaN neighbour is left out
    with pytest.raises(SpineModelError, match="select_window"):
        selection_score(history, 0)


@pytest.mark.parametrize(("window", "kept_epoch"), [(1, 2), (3, 6)])
def test_stage_keeps_the_epoch_its_selection_window_prefers(tmp_path, window, kept_epoch):
    """One lucky evaluation (epoch 2) wins with window 1; with 3 the end of the best stretch wins,
    and the stage is left holding that epoch's weights."""
    from spinemm.training.stage_fit import fit_stage

    scores = iter([0.9, 0.5, 0.8, 0.6, 0.6, 0.61])
    config = load_config(None, ["train.cpu=true", "log.progress=false", "log.tensorboard=false",
                                "checkpoint.every_steps=0", "grader.epochs=6", "grader.batch_size=2",
                                f"grader.select_window={window}", "optim.warmup_ratio=0"])
    module = torch.nn.Linear(1, 1)
    weights: dict[int, torch.Tensor] = {}

    def eval_fn(m):
        weights[len(weights) + 1] = m.weight.detach().clone()
        return {"score": next(scores)}

    data = [{"x": torch.ones(1)} for _ in range(4)]
    state, _ = fit_stage(config, "grader", module, data, lambda m, b: (m(b["x"]).square().mean(), {}), eval_fn,
                         tmp_path)
    assert state.best_epoch == kept_epoch
    torch.testing.assert_close(module.weight, weights[kept_epoch], rtol=0, atol=0)


def _window_run(out: Path, *extra: str) -> tuple[torch.nn.Linear, dict[int, torch.Tensor], object]:
    """A 1-weight stage pulled towards 5 for 6 epochs, scored by its distance from 5, its weights
    averaged over the selection window (3)."""
    from spinemm.training.stage_fit import fit_stage

    config = load_config(None, ["train.cpu=true", "log.progress=false", "log.tensorboard=false",
                                "checkpoint.every_steps=0", "grader.epochs=6", "grader.batch_size=2",
                                "grader.select_window=3", "grader.average_window=true", "grader.lr=0.3",
                                "optim.warmup_ratio=0", *extra])
    torch.manual_seed(0)
    module = torch.nn.Linear(1, 1, bias=False)
    weights: dict[int, torch.Tensor] = {}

    def eval_fn(m):
        weights[len(weights) + 1] = m.weight.detach().clone()
        return {"score": float((m.weight.detach() - 5).abs().sum())}

    data = [{"x": torch.ones(1)} for _ in range(4)]
    state, _ = fit_stage(config, "grader", module, data, lambda m, b: ((m(b["x"]) - 5).abs().mean(), {}),
                         eval_fn, out)
    return module, weights, state


def test_average_window_keeps_the_mean_of_the_selected_evaluations(tmp_path):
    module, weights, state = _window_run(tmp_path)
    assert state.best_epoch == 6  # the weight nears 5 at every epoch: the last window is the best
    expected = torch.stack([weights[4], weights[5], weights[6]]).mean(0)
    torch.testing.assert_close(module.weight, expected, rtol=0, atol=1e-7)
    assert not torch.allclose(module.weight, weights[6])  # an average, not the last evaluation
    assert sorted(f.name for f in (tmp_path / "window").iterdir()) == [f"epoch-{e}.safetensors" for e in (4, 5, 6)]


def test_average_window_resumes_to_the_same_average(tmp_path):
    reference, _, _ = _window_run(tmp_path / "a")
    stopped, _, state = _window_run(tmp_path / "b", "grader.stop_at_step=9")
    assert state.stopped
    resumed, _, state = _window_run(tmp_path / "b", "resume=latest")
    assert not state.stopped and state.best_epoch == 6
    torch.testing.assert_close(resumed.weight, reference.weight, rtol=0, atol=0)


def test_average_window_of_a_fresh_run_ignores_an_earlier_runs_weights(tmp_path):
    from safetensors.torch import save_file

    every_two = "grader.eval_every_epochs=2"  # evaluations at epochs 2, 4, 6: the window is all three
    reference, _, _ = _window_run(tmp_path / "a", every_two)
    (tmp_path / "b" / "window").mkdir(parents=True)  # an earlier run's epoch 5, inside that window
    save_file({"weight": torch.full((1, 1), 100.0)}, str(tmp_path / "b" / "window" / "epoch-5.safetensors"))
    fresh, _, _ = _window_run(tmp_path / "b", every_two)
    torch.testing.assert_close(fresh.weight, reference.weight, rtol=0, atol=0)


def test_average_window_names_a_damaged_snapshot(tmp_path):
    _window_run(tmp_path, "grader.stop_at_step=9")
    (tmp_path / "window" / "epoch-4.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SpineModelError, match=r"epoch-4\.safetensors: cannot read"):
        _window_run(tmp_path, "resume=latest")


def test_study_splits_from_config():
    from spinemm.training.common import split_studies

    frame = pd.DataFrame({"study_id": np.repeat(np.arange(100, 120), 25)})
    folds = [split_studies(frame, load_config(None, [f"split.fold={k}", "split.folds=4"])) for k in range(4)]
    vals = [set(v) for _, v in folds]
    assert all(len(v) == 5 for v in vals) and set().union(*vals) == set(range(100, 120))
    assert all(not (set(t) & v) for (t, _), v in zip(folds, vals, strict=True))
    train, val = split_studies(frame, load_config(None, ["split.val_fraction=0.25", "data.max_studies=8"]))
    assert len(val) == 2 and len(train) == 6 and set(train + val) == set(range(100, 108))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def _assert_same_run(a: dict, a_out: Path, b: dict, b_out: Path) -> None:
    wa, wb = _weights(a_out), _weights(b_out)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)
    assert [h["score"] for h in a["history"]] == pytest.approx([h["score"] for h in b["history"]], abs=1e-6)


def test_stop_then_resume_matches_uninterrupted(full_run, phantom_root, tmp_path):
    reference, ref_out = full_run
    stopped = _run(phantom_root, tmp_path, "train.stop_at_step=4")
    assert stopped["stopped"] and stopped["state"].step == 4 and not (tmp_path / "model").exists()
    resumed = _run(phantom_root, tmp_path, "--resume", "latest")
    assert resumed["state"].step == 6 and not resumed["stopped"]
    _assert_same_run(reference, ref_out, resumed, tmp_path)
    # resuming a finished run is a no-op that reproduces its outputs
    again = _run(phantom_root, tmp_path, "resume=latest")
    assert again["state"].step == 6
    _assert_same_run(reference, ref_out, again, tmp_path)


def test_a_recipe_refuses_another_runs_checkpoints(full_run, phantom_root, tmp_path):
    import shutil

    _, ref_out = full_run
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    with pytest.raises(SpineModelError, match=r"other settings \(optim.lr 0.002 -> 0.0001"):
        _run(phantom_root, out, "optim.lr=1e-4", "resume=latest")
    with pytest.raises(SpineModelError, match="holds checkpoints of an earlier run"):
        _run(phantom_root, out, "optim.lr=1e-4")
    fresh = _run(phantom_root, out, "optim.lr=1e-4", "checkpoint.overwrite=true")
    assert fresh["state"].step == 6


def test_kill_during_save_then_resume(full_run, phantom_root, tmp_path, monkeypatch):
    """A crash inside the step-4 save: checkpoint-2 stays the latest, and resuming from it still
    lands on the uninterrupted run's weights (gradient accumulation on, to cover its counters)."""
    real_commit = ckpt_mod._commit

    def crash_at_4(tmp: Path, final: Path) -> None:
        if final.name == "checkpoint-4":
            raise RuntimeError("simulated kill during save")
        real_commit(tmp, final)

    accum = ["data.batch_size=1", "train.gradient_accumulation_steps=2"]
    monkeypatch.setattr(ckpt_mod, "_commit", crash_at_4)
    with pytest.raises(RuntimeError, match="simulated kill"):
        _run(phantom_root, tmp_path, *accum)
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    assert (tmp_path / "checkpoint-4.tmp").is_dir()
    monkeypatch.undo()
    resumed = _run(phantom_root, tmp_path, *accum, "resume=latest")
    assert resumed["state"].step == 6 and not (tmp_path / "checkpoint-4.tmp").exists()

    reference_out = tmp_path.parent / f"{tmp_path.name}-ref"
    reference = _run(phantom_root, reference_out, *accum)
    _assert_same_run(reference, reference_out, resumed, tmp_path)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_resolves(path):
    from spinemm.training import load_config

    config = load_config(path)  # unknown keys or bad values raise
    assert config["model"]["name"] in spinemm.list_models()
