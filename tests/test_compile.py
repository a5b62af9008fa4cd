"""torch.compile(fullgraph=True) and bf16 autocast give the eager fp32 answers (CPU, inductor)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import spinemm
from spinemm.models.config import GraderConfig, LocatorConfig
from spinemm.models.lora import add_lora
from spinemm.pipeline import GradeStage, LocateStage, SpinePipeline


def _pipeline() -> SpinePipeline:
    torch.manual_seed(0)
    detect = spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32})
    encoder = spinemm.create_model("spine-tiny", **{"vision.image_size": 32})  # the clip grader's towers
    grade = GradeStage(GraderConfig(backbone="clip", size=32, layers=1), encoder=encoder)
    return SpinePipeline(detect, LocateStage(LocatorConfig(size=32, channels=(8, 16, 16))), grade)


def _final(result) -> tuple[np.ndarray, np.ndarray]:
    located = result.findings
    return result.probs, np.stack([located.x, located.y], axis=-1)


@pytest.mark.slow
def test_compiled_pipeline_predicts_what_eager_does(phantom_root):
    pipeline = _pipeline()
    probs, points = _final(spinemm.predict(pipeline, phantom_root, split="test", progress=False))
    compiled = spinemm.predict(copy.deepcopy(pipeline), phantom_root, split="test", progress=False, compile=True)
    assert compiled.grade_probs is not None and not np.isnan(compiled.grade_probs).all()  # the grader ran
    compiled_probs, compiled_points = _final(compiled)
    np.testing.assert_allclose(compiled_probs, probs, atol=1e-4)
    np.testing.assert_allclose(compiled_points, points, atol=1e-2, equal_nan=True)  # pixels of 64 px slices


def test_bf16_autocast_predicts_close_to_fp32(phantom_root):
    """Each stage under bf16 autocast gives its fp32 answer to bf16's 2-3 decimal digits, from the
    same inputs. An untrained pipeline's located points are near-ties that bf16 may flip (a slice or
    tens of pixels away), so the grade stage is compared at the fp32 run's located points."""
    from spinemm.data.store import SeriesStore

    pipeline = _pipeline()
    store = SeriesStore(phantom_root, "test")
    result = spinemm.predict(pipeline, phantom_root, split="test", store=store, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = spinemm.predict(pipeline, phantom_root, split="test", store=store, progress=False)
        grades = pipeline.grade.grade(result.located, store)
    assert np.abs(low.detect_probs - result.detect_probs).max() < 0.01
    graded = ~np.isnan(result.grade_log_probs[:, 0])
    assert graded.sum() > 10
    low_grades, grades_fp32 = np.exp(grades.log_probs[graded]), np.exp(result.grade_log_probs[graded])
    assert np.abs(low_grades - grades_fp32).max() < 0.01  # bf16 keeps 8 bits of mantissa: 2-3 decimal digits


@pytest.mark.slow
def test_lora_training_step_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    eager = add_lora(spinemm.create_model("spine-tiny", num_slices=2, **{"vision.image_size": 32}), r=4)
    with torch.no_grad():  # lora_B starts at zero; give the adapters values, as training would
        for name, param in eager.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    compiled = copy.deepcopy(eager)
    compiled.vision.compile(fullgraph=True)  # nn.Module.compile: in place, weights and names unchanged
    series = torch.rand(2, 2, 3, 32, 32)
    losses, grads = [], []
    for model in (eager, compiled):
        tokens, pooled = model.vision(series)
        loss = tokens.square().mean() + pooled.mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.vision.named_parameters() if p.grad is not None})
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and any(".lora_" in n for n in grads[0])
    assert not any(".lora_" not in n for n in grads[0])  # only the adapters train
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
