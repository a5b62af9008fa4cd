"""The `spinemm` command line: phantom, inspect (+ montage), evaluate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from spinemm.cli import main
from spinemm.constants import SUBMISSION_COLUMNS


def test_phantom_command_writes_layout_and_reports_scores(tmp_path, capsys):
    root = tmp_path / "ph"
    assert main(["phantom", str(root), "--n-studies", "3", "--n-test", "2", "--image-size", "32", "--quiet"]) == 0
    out = capsys.readouterr().out
    info = json.loads((root / "phantom_info.json").read_text())
    assert f"{info['prior_score']:.4f}" in out and f"{info['oracle_score']:.4f}" in out
    assert (root / "train.csv").exists() and (root / "test_series_descriptions.csv").exists()


def test_phantom_overwrite_replaces_a_phantom_and_never_other_data(tmp_path, capsys):
    args = ["phantom", str(tmp_path / "ph"), "--n-studies", "2", "--n-test", "2", "--image-size", "24", "--quiet"]
    assert main(args) == 0
    first = (tmp_path / "ph" / "train.csv").read_bytes()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err  # refused, and told the way out
    assert main([*args, "--overwrite"]) == 0 and (tmp_path / "ph" / "train.csv").read_bytes() == first
    assert not (tmp_path / "ph" / ".phantom-unfinished").exists()
    # an interrupted phantom (its marker, some images, no tables) is replaced too
    (tmp_path / "ph" / "phantom_info.json").unlink()
    (tmp_path / "ph" / ".phantom-unfinished").write_text("")
    assert main([*args, "--overwrite"]) == 0
    # a folder of real data is never deleted
    real = tmp_path / "rsna"
    (real / "train_images").mkdir(parents=True)
    (real / "train.csv").write_text("study_id\n1\n")
    assert main(["phantom", str(real), "--overwrite", "--quiet"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err and (real / "train.csv").read_text() == "study_id\n1\n"


def test_a_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    import sys

    script = ("import sys; from spinemm.cli import run_guarded; "
              "sys.exit(run_guarded(lambda: [print('x' * 100) for _ in range(100_000)], 'spinemm x', False))")
    proc = subprocess.run(["bash", "-c", f'{sys.executable} -c "{script}" | head -1; echo "rc=${{PIPESTATUS[0]}}"'],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines() == ["x" * 100, "rc=0"] and proc.stderr == "", proc.stderr


def test_inspect_summarises_and_draws(phantom_root, tmp_path, capsys):
    png = tmp_path / "montage.png"
    assert main(["inspect", str(phantom_root), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "8 studies" in out
    for plane in ("Sagittal T1", "Sagittal T2/STIR", "Axial T2"):
        assert plane in out
    assert "labels per condition" in out
    assert png.stat().st_size > 10_000  # a real picture, not an empty canvas


def test_evaluate_perfect_vs_uniform(phantom_root, tmp_path, capsys):
    solution = pd.read_csv(phantom_root / "solution.csv")
    perfect = solution[["row_id", *SUBMISSION_COLUMNS]].copy()
    uniform = perfect.copy()
    uniform[list(SUBMISSION_COLUMNS)] = 1 / 3
    scores = {}
    for name, frame in (("perfect", perfect), ("uniform", uniform)):
        sub = tmp_path / f"{name}.csv"
        frame.to_csv(sub, index=False)
        out_json = tmp_path / f"{name}.json"
        assert main(["evaluate", "--solution", str(phantom_root / "solution.csv"), "--submission", str(sub),
                     "--json", str(out_json)]) == 0
        assert "official score" in capsys.readouterr().out
        scores[name] = json.loads(out_json.read_text())["score"]
    assert scores["perfect"] < 1e-6
    assert scores["uniform"] == pytest.approx(np.log(3), rel=0.2)


def test_bad_input_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and ".csv" in err and str(tmp_path / "empty") in err


def test_zero_shot_command_scores_dicom_files(phantom_root, tmp_path, capsys):
    import spinemm

    model_dir = tmp_path / "model"
    spinemm.create_model("spine-tiny").save_pretrained(model_dir)
    files = sorted((phantom_root / "train_images").glob("*/*/*.dcm"))[:2]
    assert main(["zero-shot", "--model", str(model_dir), *map(str, files)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, f in zip(lines, files, strict=True):
        assert line.startswith(str(f))
        probs = [float(part.split(": ")[1]) for part in line.split("(")[1].rstrip(")").split("  ")]
        assert len(probs) == 3 and abs(sum(probs) - 1) < 2e-3  # printed to 3 decimals


def test_zero_shot_command_scores_a_crop_around_a_point(phantom_root, tmp_path, capsys):
    import torch

    import spinemm
    from spinemm.zero_shot import crop_finding

    torch.manual_seed(0)
    model = spinemm.create_model("spine-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(4.6)  # a sharp softmax, so a different crop prints different numbers
    model.save_pretrained(tmp_path / "model")
    model = spinemm.load_model(tmp_path / "model")
    dcm = sorted((phantom_root / "train_images").glob("*/*/*.dcm"))[0]
    assert main(["zero-shot", "--model", str(tmp_path / "model"), str(dcm), "--at", "20", "24"]) == 0
    printed = capsys.readouterr().out.split("(")[1].rstrip(")\n").split("  ")
    crop = crop_finding(dcm, 20, 24, side_mm=model.config.roi_side_mm, size=model.image_size)  # reads PixelSpacing
    expect = spinemm.zero_shot_classify(model, crop[None], spinemm.text.severity_prompts("spinal_canal_stenosis"))
    assert [float(part.split(": ")[1]) for part in printed] == pytest.approx(expect[0].tolist(), abs=1e-3)


@pytest.mark.slow
def test_demo_refuses_an_earlier_demo_folder_unless_told(tmp_path, capsys):
    (tmp_path / "demo" / "phantom").mkdir(parents=True)
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 2
    assert "already holds a demo run: `spinemm demo --overwrite` replaces it" in capsys.readouterr().err


def test_demo_quick_end_to_end(tmp_path, capsys, count_reads):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    # Pretraining, the detect stage, the later stages, predictions and the report of one demo run
    # share the cache folder: no DICOM file is decoded twice.
    files = {str(p) for p in (tmp_path / "demo" / "phantom").rglob("*.dcm")}
    assert files and set(count_reads) <= files
    assert max(count_reads.values()) == 1, count_reads.most_common(3)
    out = capsys.readouterr().out
    report = tmp_path / "demo" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert f"official score {metrics['official_score']:.4f}" in out
    assert metrics["prior_score"] > metrics["oracle_score"] > 0
    zero_shot = metrics["zero_shot"]
    assert zero_shot["chance"] == pytest.approx(1 / 3) and zero_shot["n_crops"] > 0
    # accuracy is a count of right crops over n_crops, and the printed numbers are the saved ones
    right = zero_shot["accuracy"] * zero_shot["n_crops"]
    assert right == pytest.approx(round(right))
    assert f"zero-shot balanced accuracy {zero_shot['balanced_accuracy']:.3f}" in out
    for name in ("summary.md", "confusion_matrix.png", "training_curves.png", "submission.csv", "locations.csv",
                 "stage_curves.png", "grader_attention.png", "index.html"):
        assert (report / name).stat().st_size > 0, name
    page = (report / "index.html").read_text()
    order = ["Held-out score", "Training curves of every stage", "Confusion matrix", "Where each finding is",
             "What the grader looked at", "Grades per level", "All metrics"]
    assert [page.index(h) for h in order] == sorted(page.index(h) for h in order)
    for picture in ("stage_curves.png", "grader_attention.png", "confusion_matrix.png"):
        assert f'src="{picture}"' in page
    assert list(report.glob("study_*.png")), "no location overlay"
    submission = pd.read_csv(report / "submission.csv")
    assert len(submission) == len(pd.read_csv(tmp_path / "demo" / "phantom" / "sample_submission.csv"))


@pytest.mark.parametrize("flag, value", [("--level", "L9"), ("--condition", "foo")])
def test_zero_shot_choices_are_checked_before_a_model_loads(flag, value, monkeypatch, capsys):
    import spinemm.models.factory as factory

    monkeypatch.setattr(factory, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(SystemExit) as done:
        main(["zero-shot", "--model", "spine-tiny", flag, value, "x.dcm"])
    assert done.value.code == 2 and f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err
