"""One stage interface: a new stage is one class and one registration line, and the pipeline
trains (through the engine), runs, saves and loads it like the built-in ones."""

from __future__ import annotations

import ast
import inspect
import textwrap

import numpy as np
import pytest
import torch

import spinemm
from spinemm.constants import LABEL_COLUMNS
from spinemm.pipeline import registry
from spinemm.pipeline.stage import Stage, StageInput, StageOutput
from spinemm.training import stages as training_stages
from spinemm.training.config import DEFAULTS
from spinemm.training.stage_fit import fit_stage


# ----------------------------------------------------------------------- the toy fourth stage
class Calibrate(Stage):
    """Re-weights the grades so far: probabilities ∝ p · exp(bias), one learned bias per class."""

    name = "calibrate"

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(3))

    def forward(self, log_probs: torch.Tensor) -> torch.Tensor:
        return log_probs + self.bias

    @torch.no_grad()
    def run(self, inputs: StageInput) -> StageOutput:
        log_probs = torch.from_numpy(np.log(np.clip(inputs.probs, 1e-12, None))).float()
        return StageOutput(inputs.findings, self(log_probs).softmax(-1).double().numpy())


def _labelled_rows(pipeline, run, study_ids):
    result = pipeline.run(run.root, "train", study_ids=study_ids, store=run.store, progress=False)
    labels = np.full((len(study_ids), len(LABEL_COLUMNS)), -1)
    rows = run.frame[run.frame.study_id.isin(study_ids)]
    labels[rows.study_id.map({s: i for i, s in enumerate(study_ids)}), rows.target] = rows.label
    keep = labels.reshape(-1) >= 0
    log_probs = np.log(np.clip(result.probs.reshape(-1, 3), 1e-12, None))[keep]
    return torch.from_numpy(log_probs).float(), torch.from_numpy(labels.reshape(-1)[keep])


def train_calibrate(config, run, pipeline, output_dir, progress):
    stage = Calibrate()
    train = [{"log_probs": x, "label": y} for x, y in zip(*_labelled_rows(pipeline, run, run.train_ids), strict=True)]
    val_x, val_y = _labelled_rows(pipeline, run, run.val_ids)

    def step(module, batch):
        return torch.nn.functional.cross_entropy(module(batch["log_probs"]), batch["label"]), {}

    def evaluate(module):
        with torch.no_grad():
            return {"score": float(torch.nn.functional.cross_entropy(module(val_x), val_y))}

    state, metrics = fit_stage(config, "calibrate", stage, train, step, evaluate, output_dir)
    return {"stage": None if state.stopped else stage, "history": state.history, "metrics": metrics}


SECTION = {"epochs": 3, "lr": 0.5, "weight_decay": 0.0, "batch_size": 64, "eval_every_epochs": 1,
           "select_window": 1, "stop_at_step": None}


@pytest.fixture
def calibrate_registered(monkeypatch):
    """The registration line, undone after the test (the registries are global)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(training_stages, "_TRAINERS", dict(training_stages._TRAINERS))
    training_stages.register_trainer(Calibrate, train_calibrate, section="calibrate", defaults=SECTION)
    yield
    DEFAULTS.pop("calibrate", None)


def test_a_fourth_stage_trains_runs_saves_and_loads(calibrate_registered, phantom_root, tmp_path):
    torch.manual_seed(0)
    spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32}).save_pretrained(tmp_path / "d")
    config = {"init_from": str(tmp_path / "d"), "data": {"root": str(phantom_root)},
              "split": {"val_fraction": 0.25}, "train": {"cpu": True, "mixed_precision": "no"},
              "log": {"tensorboard": False, "progress": False},
              "pipeline": {"output_dir": str(tmp_path / "stages"), "stages": ["calibrate"]}}
    trained = spinemm.training.train_stages(config, ["calibrate.epochs=2"])  # its section takes overrides
    assert len(trained["stages"]["calibrate"]["history"]) == 2
    pipeline = spinemm.load_pipeline(trained["pipeline_dir"])
    assert pipeline.stage_names == ["detect", "calibrate"] and isinstance(pipeline.calibrate, Calibrate)
    bias = pipeline.calibrate.bias.detach()
    assert bias.abs().max() > 1e-3  # it learned something, and that came back from the folder

    result = spinemm.predict(pipeline, phantom_root, split="test", progress=False)
    assert list(result.outputs) == ["detect", "calibrate"]
    detect = result.detect_probs.reshape(-1, 3)
    expected = torch.from_numpy(np.log(detect)).float().add(bias).softmax(-1).double().numpy()
    np.testing.assert_allclose(result.probs.reshape(-1, 3), expected, atol=1e-6)
    assert not np.allclose(result.probs, result.detect_probs)
    # it composes after the built-in stages without touching them
    grade_free = spinemm.SpinePipeline(pipeline.detect.model, pipeline.calibrate)
    assert grade_free.stage_names == ["detect", "calibrate"] and grade_free.grade is None


def test_an_unregistered_stage_is_refused_by_name(tmp_path):
    class Stray(Stage):
        name = "stray"

    with pytest.raises(spinemm.SpineModelError, match="unknown stage 'stray'"):
        spinemm.SpinePipeline(spinemm.create_model("spine-tiny"), Stray())


@pytest.mark.parametrize("method", ["run", "to", "eval", "compile", "_save_pretrained", "__init__"])
def test_the_pipeline_names_no_stage_class(method):
    """SpinePipeline loops over its stages: no stage class, and no built-in stage's name, in its code."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(spinemm.SpinePipeline, method))))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not names & {"DetectStage", "LocateStage", "GradeStage"}
    assert not strings & {"detect", "locate", "grade"}
    loader = inspect.getsource(spinemm.load_pipeline)
    assert not any(name in loader for name in ("DetectStage", "LocateStage", "GradeStage", '"locate"', '"grade"'))


def test_register_stage_takes_named_stage_classes_once(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Other(Stage):
        name = "grade"  # a built-in's name: refused, never silently replaced

    with pytest.raises(spinemm.SpineModelError, match="already registered"):
        registry.register_stage(Other)
    with pytest.raises(spinemm.SpineModelError, match="Stage subclass"):
        registry.register_stage(torch.nn.Linear)
    assert registry.register_stage(Calibrate) is Calibrate  # usable as a decorator
    assert registry.registered_stages() == ["detect", "locate", "grade", "calibrate"]
