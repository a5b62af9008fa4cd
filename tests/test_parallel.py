"""Predict spread over processes: forked CPU workers and `accelerate launch` ranks give one process's rows."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

import spinemm
from spinemm.models.config import GraderConfig, LocatorConfig
from spinemm.pipeline import GradeStage, LocateStage, SpinePipeline
from spinemm.pipeline.parallel import shares


def _pipeline() -> SpinePipeline:
    torch.manual_seed(0)
    detect = spinemm.create_model("spine-tiny", num_slices=4, **{"vision.image_size": 32})
    grade = GradeStage(GraderConfig(backbone="cnn", size=16, channels=(8, 16)), query_dim=detect.config.fusion.dim)
    return SpinePipeline(detect, LocateStage(LocatorConfig(size=32, channels=(8, 16, 16))), grade)


def test_shares_are_contiguous_cover_every_study_once():
    assert shares([5, 1, 9, 3, 7], 2) == [[5, 1, 9], [3, 7]]
    assert shares([4, 2], 3) == [[4], [2]]  # no empty shares
    assert sum(shares(list(range(11)), 4), []) == list(range(11))


def test_predict_in_worker_processes_matches_one_process(phantom_root):
    pipeline = _pipeline()
    one = spinemm.predict(pipeline, phantom_root, split="test", progress=False)
    two = spinemm.predict(pipeline, phantom_root, split="test", progress=False, workers=2)
    assert two.study_ids == one.study_ids  # the shares come back in study order
    # the same rows; batches of other sizes may round differently in the last float bits
    pd.testing.assert_frame_equal(two.submission(), one.submission(), check_exact=False, rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(two.locations(), one.locations(), check_exact=False, rtol=0, atol=1e-4)
    np.testing.assert_allclose(two.detect_probs, one.detect_probs, atol=1e-6)  # every stage's output is kept


# Runs the CLI under each rank, printing the share that rank predicts (proof that the work was split).
_RANK_SCRIPT = """
import os, sys
import spinemm.pipeline.parallel as parallel
real = parallel.shares
def shares(ids, parts):
    out = real(ids, parts)
    print(f"rank {os.environ['RANK']} of {parts}: {len(out[int(os.environ['RANK'])])} studies", flush=True)
    return out
parallel.shares = shares
from spinemm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_predict_under_accelerate_launch_two_processes(phantom_root, tmp_path, launch_two_cpu):
    folder = _pipeline().save_pretrained(tmp_path / "pipeline")
    expected = spinemm.predict(spinemm.load_pipeline(folder), phantom_root, split="test", progress=False)
    script = tmp_path / "rank_predict.py"
    script.write_text(_RANK_SCRIPT)
    proc = launch_two_cpu(str(script), "predict", "--model", str(folder), "--data", str(phantom_root),
                          "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    n = len(expected.study_ids)
    # the two ranks print at once into one pipe: their lines can run together, so match, not split
    assert sorted(re.findall(r"rank \d+ of \d+: \d+ studies", proc.stdout)) == \
        [f"rank 0 of 2: {(n + 1) // 2} studies", f"rank 1 of 2: {n // 2} studies"]
    assert proc.stdout.count("wrote ") == 1  # every rank has every row; one writes them
    submission = pd.read_csv(tmp_path / "out" / "submission.csv")
    pd.testing.assert_frame_equal(submission, expected.submission(), check_exact=False, rtol=1e-5, atol=1e-7)
    assert len(pd.read_csv(tmp_path / "out" / "locations.csv")) == len(expected.locations())
