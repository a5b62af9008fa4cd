"""The base-preset benchmark and the one-command GPU check run end to end (their dry runs, on a CPU).

The dry runs swap the ViT-B/16 + BERT-base towers for tiny ones but run the same code path:
pretrain -> detect -> locate + grade -> predict -> save_pretrained -> load_pipeline. The slow test
runs the real base-preset sizes (random weights, offline) for one step a stage.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
STAGES = ("pretrain", "detect", "locate", "grade")


def _benchmark(name: str):
    if str(BENCHMARKS) not in sys.path:  # the scripts import their shared helpers (anchors.py)
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory) -> Path:
    """8 train + 2 test studies at 64 px, shared by this module's dry runs."""
    from spinemm.data import make_phantom

    root = tmp_path_factory.mktemp("base_presets_phantom")
    make_phantom(root, n_studies=8, n_test=2, seed=0, image_size=64, progress=False)
    return root


def _check_results(results: dict, steps: int) -> None:
    assert results["roundtrip_ok"] and results["pipeline_stages"] == ["detect", "locate", "grade"]
    for name in STAGES:
        stage = results["stages"][name]
        assert 1 <= stage["steps"] <= steps and stage["seconds_per_step"] > 0 and stage["peak_bytes"] > 0
        assert stage["train_flops_per_study"] > 0
    for name in ("detect", "locate", "grade"):
        assert results["stages"][name]["infer_flops_per_study"] > 0
    budget = {row["stage"]: row for row in results["budget"]}
    total = budget["total"]
    assert total["h100x8_hours"] == pytest.approx(total["h100_hours"] / 8)
    assert total["h100_hours"] == pytest.approx(sum(r["h100_hours"] for s, r in budget.items() if s != "total"))
    detect = budget["detect"]  # the recipe's 12 epochs over 1,975 studies at 40% of 989 TFLOP/s
    assert detect["epochs"] == 12
    assert detect["h100_hours"] == pytest.approx(detect["flops_per_study"] * 12 * 1975 / (0.4 * 989e12) / 3600)


@pytest.mark.slow
def test_gpu_check_dry_run_writes_one_table(small_phantom, tmp_path, capsys):
    """One dry run covers every benchmark it runs: the base-preset pipeline end to end (its results
    and budget table), the train and inference throughput scripts (their FLOP-utilisation tables)
    and predict throughput, each with a finite key number."""
    report = _benchmark("gpu_check").main(["--dry-run", "--phantom", str(small_phantom), "--out", str(tmp_path),
                                           "--markdown", str(tmp_path / "check.md")])
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["base_presets", "train_throughput", "inference_throughput", "predict_throughput"]
    assert all(row["status"] == "ok" and row["key"] for row in rows.values()), report["rows"]
    assert rows["base_presets"]["ratio"] is None
    assert all(math.isfinite(rows[n]["ratio"]) and rows[n]["ratio"] > 0 for n in list(rows)[1:])
    assert (tmp_path / "check.md").read_text().startswith("GPU check on CPU")
    _check_results(json.loads((tmp_path / "base_presets.json").read_text()), steps=1)
    out = capsys.readouterr().out
    assert "| predict_throughput |" in out and "| grade |" in out and "hours, 8 H100" in out
    assert out.count("model FLOP utilisation") >= 2  # the train and the inference tables


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SPINEMM_BASE_PRESETS"),
                    reason="ViT-B/16 + BERT-base at real sizes: ~5 min and ~12 GiB on a CPU; set SPINEMM_BASE_PRESETS=1 "
                           "(the dry runs above take the same code path in CI)")
def test_base_presets_real_sizes_one_step_a_stage(tmp_path):
    # 2 studies (2 folds: 1 train, 1 val) + 1 test study, so one step is one study: on a CPU about
    # 5-10 minutes and 14 GiB (the detect step's 48 ViT-B/16 slices, bf16 autocast)
    results = _benchmark("base_presets").main(["--device", "cpu", "--steps", "1", "--studies", "2",
                                               "--test-studies", "1", "--out", str(tmp_path)])
    _check_results(results, steps=1)
    detect = results["stages"]["detect"]["train_flops_per_study"]  # 48 ViT-B/16 slices at 224 px a study
    assert detect > 48 * 2 * 17e9


def test_save_model_merges_lora_of_a_model_prepared_for_bf16(tmp_path):
    # The base recipe trains with LoRA under bf16: accelerate runs the prepared model's forward under
    # autocast, and the merge check (fp32, 1e-4) must not compare bf16 outputs (it failed at the
    # detect stage's first save). The prepared model keeps its autocast forward.
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    import spinemm
    from spinemm.models.lora import add_lora, probe_batch
    from spinemm.training.common import save_model

    torch.manual_seed(0)
    model = add_lora(spinemm.create_model("spine-tiny", num_slices=2), r=4, alpha=8)
    with torch.no_grad():  # lora_B starts at zero: give it values, as training would
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.1)
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    prepared = accelerator.unwrap_model(accelerator.prepare(model))
    save_model(prepared, tmp_path / "m")
    batch = probe_batch(prepared)
    prepared.eval()
    with torch.no_grad():
        autocast = prepared(batch)["logits"]
        loaded = spinemm.load_model(tmp_path / "m").eval()(batch)["logits"]
        plain = prepared._original_forward(batch)["logits"]
    assert autocast.dtype == torch.float32 and not torch.equal(autocast, plain)  # still under autocast
    assert (loaded - plain).abs().max() <= 1e-4
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
