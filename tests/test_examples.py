"""The examples run (tiny settings), so the README's pointers stay true."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

# every test runs an example script end to end
pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(tmp_path):
    result = _load("quickstart").main(["--out", str(tmp_path), "--n-studies", "3", "--image-size", "32"])
    assert result["frame_rows"] == 3 * 25
    assert result["logits_shape"] == (2, 25, 3)


def test_zero_shot_example(phantom_root):
    probs = _load("zero_shot").main(["--data", str(phantom_root), "--max-crops", "5"])
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_predict_folder_example(phantom_root, tmp_path):
    submission, locations = _load("predict_folder").main(
        ["--model", "spine-tiny", "--data", str(phantom_root), "--out", str(tmp_path)])
    assert (tmp_path / "submission.csv").exists() and len(submission) == len(locations)
