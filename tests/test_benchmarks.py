"""The benchmark scripts run (tiny settings); their numbers are recorded in benchmarks/RESULTS.md."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

# every test runs a benchmark script end to end
pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_model_step_benchmark_runs_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("model_step", BENCHMARKS / "model_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--size", "tiny", "--batch", "1", "--steps", "1", "--warmup", "0", "--device", "cpu"])
    assert [r["name"] for r in rows] == ["vision tower alone (anchor)", "SpineCLIP step (studies)"]
    assert all(r["seconds"] > 0 and math.isfinite(r["images_per_s"]) for r in rows)
    assert "| SpineCLIP step (studies) |" in capsys.readouterr().out
