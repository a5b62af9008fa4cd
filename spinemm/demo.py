"""`spinemm demo`: the whole product on the built-in phantom, end to end, on a CPU in minutes.

phantom -> contrastive pretraining of the grader's towers on finding crops (its last evaluation
is the zero-shot check) -> the detect stage (severity + location training on whole slices) -> the
later stages (the level locator on sagittal slices, then the grader: the pretrained BERT tower's
metadata queries over the pretrained vision tower's finding-crop tokens) -> held-out
predictions of the whole pipeline, every stage's output kept -> the official score -> a report
folder. The score is printed beside the phantom's prior-only score and oracle floor, so it says
where the model stands between "knows nothing" and "perfect". Every recipe reads its series from
the same cache folder, so each DICOM file is decoded once per demo.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .constants import SEVERITIES
from .demo_report import report_pictures, write_report_page
from .files import write_atomic, write_together

#: Settings of the full demo; ``quick`` shrinks them for smoke tests.
DEMO = {"n_studies": 160, "n_test": 40, "phantom_size": 96, "image_size": 64, "num_slices": 8,
        "pretrain_epochs": 6, "epochs": 12, "locator_epochs": 15, "grader_epochs": 45, "batch_size": 4,
        "lr": 2e-3, "grader": "cnn", "fold_sides": True, "oblique_axial": 0.0, "variety": None}
QUICK = {"n_studies": 8, "n_test": 3, "phantom_size": 48, "image_size": 32, "num_slices": 4,
         "pretrain_epochs": 1, "epochs": 1, "locator_epochs": 1, "grader_epochs": 1, "batch_size": 4,
         "lr": 2e-3, "grader": "cnn", "fold_sides": True, "oblique_axial": 0.0, "variety": None}


def demo_config(out: Path, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """The recipe config the demo trains with (the same keys as ``recipes/configs/tiny.yaml``)."""
    towers = _pretrain_towers(settings)
    return {
        "output_dir": str(out / "severity"),
        # the detect stage starts from pretraining's model unless pretraining built other towers
        "init_from": None if towers else str(out / "pretrain" / "model"),
        "model": {"name": "spine-tiny"},
        "data": {"root": str(out / "phantom"), "num_slices": settings["num_slices"],
                 "image_size": settings["image_size"], "batch_size": settings["batch_size"],
                 "cache_dir": str(out / "cache"), "augment": True},
        "split": {"val_fraction": 0.2, "seed": seed},
        "train": {"seed": seed, "epochs": settings["epochs"], "mixed_precision": "no", "cpu": True},
        "optim": {"lr": settings["lr"], "warmup_ratio": 0.1},
        "checkpoint": {"every_steps": 10_000, "keep_last": 1},
        "log": {"tensorboard": False, "progress": True},
        "pretrain": {"output_dir": str(out / "pretrain"), "epochs": settings["pretrain_epochs"],
                     "towers": towers},
        "pipeline": {"output_dir": str(out / "stages")},
        # every 5th epoch (and the last) is scored as the pipeline ships: 9 val runs, not 45
        "grader": {"epochs": settings["grader_epochs"], "eval_every_epochs": 5, **_grader(out, settings)},
        "locator": {"epochs": settings["locator_epochs"]},
    }


#: The demo's crop tower, pretrained and then grading: a plain conv tower (the paper's CNN) reads
#: 32 px finding crops better than the tiny ViT on a CPU, zero-shot and as the grader. Its leaky
#: ReLU keeps the channels that contrastive pretraining would leave dead trainable for the grader
#: (benchmarks/RESULTS.md, the issue-12 section).
CONV_CROP_SIZE = 32
CONV_TOWER = {"type": "cnn", "mean": None, "std": None, "open_clip_cfg": None, "model_name": None,
              "pretrained": None, "kwargs": {"width": 64, "channels": [32, 64, 96], "negative_slope": 0.01}}


def _pretrain_towers(settings: dict[str, Any]) -> dict[str, Any] | None:
    """Pretraining trains the vision tower the grader reads: the conv tower at its 32 px for the
    ``"cnn"`` grader (its zero-shot reads better than the tiny ViT's, RESULTS.md), else the
    detect model's ViT."""
    if settings["grader"] != "cnn":
        return None
    return {"vision": {**CONV_TOWER, "image_size": CONV_CROP_SIZE}}


def _grader(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The grade stage's settings, named as the grade-stage comparison's rows. ``"cnn"``: the
    pretrained BERT text tower queries the tokens of the pretrained conv vision tower
    (:data:`CONV_TOWER` at 32 px, the tower zero-shot scoring reads); ``"clip-vit"``: the same with
    the tiny ViT, pretrained and read at 64 px; ``"cnn-film"``: the earlier grader, a ConvNet
    modulated by constant query embeddings. The ``"cnn"`` grader folds left and right findings
    (``grader.model.fold_sides``) unless the setting ``fold_sides`` is false."""
    pretrained = {"towers_from": str(out / "pretrain" / "model"), "tower_lr": settings["lr"]}
    if settings["grader"] == "cnn":
        # fold_sides: right findings read as their mirrored left twins, +2.1 points of the held-out
        # gap on every one of five seeds at no extra cost (RESULTS.md, "Quality over seeds")
        return {"model": {"backbone": "clip", "size": CONV_CROP_SIZE, "fold_sides": settings["fold_sides"]},
                **pretrained}
    if settings["grader"] == "clip-vit":
        return {"model": {"backbone": "clip", "size": settings["image_size"], "layers": 2}, **pretrained}
    if settings["grader"] == "cnn-film":
        return {"model": {"backbone": "cnn"}}
    raise ValueError(f"demo setting grader must be 'cnn', 'clip-vit' or 'cnn-film', got {settings['grader']!r}")


def run_demo(out: str | Path = "demo_out", n_studies: int | None = None, seed: int = 0,
             quick: bool = False, settings: dict[str, Any] | None = None,
             train_seed: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run the demo into ``out``; returns the metrics dict also written to ``out/report/metrics.json``.

    ``seed`` writes the phantom and, unless ``train_seed`` is given, seeds the split and training
    (``train_seed``: the same data, another training; ``benchmarks/seed_spread.py --fixed-data``).
    ``settings`` overrides entries of :data:`DEMO` (or :data:`QUICK`), e.g. fewer epochs. A folder
    that already holds a demo is refused unless ``overwrite``, which replaces its phantom and its
    runs' checkpoints (never a folder holding other data)."""
    from .data.phantom import make_phantom
    from .data.store import SeriesStore
    from .data.tables import load_tables
    from .inference import predict
    from .metrics import evaluate_frames, format_metrics, rsna_score
    from .pipeline import load_pipeline
    from .training import pretrain_clip, train_detect, train_stages
    from .training.common import split_studies
    from .training.config import load_config
    from .viz import confusion_matrix_png, training_curves_png

    start = time.perf_counter()
    seconds: dict[str, float] = {}  # wall time of each step, in metrics.json
    step_start = [start]

    def step(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = now - step_start[0]
        step_start[0] = now
    out = Path(out)
    base = QUICK if quick else DEMO
    unknown = sorted(set(settings or {}) - set(base))
    if unknown:
        raise ValueError(f"unknown demo settings {unknown}; valid: {sorted(base)}")
    settings = {**base, **(settings or {})}
    if n_studies is not None:
        settings.update(n_studies=n_studies, n_test=max(2, n_studies // 4))
    if not overwrite and any((out / name).exists() for name in ("phantom", "pretrain", "severity", "stages")):
        from .errors import SpineDataError

        raise SpineDataError(f"{out} already holds a demo run: `spinemm demo --overwrite` replaces it, or "
                             f"choose another --out")
    config = load_config(demo_config(out, settings, seed if train_seed is None else train_seed))
    config["checkpoint"]["overwrite"] = bool(overwrite)  # the earlier run's checkpoints go first
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)

    print(f"[1/6] phantom: {settings['n_studies']} train + {settings['n_test']} test studies")
    root = make_phantom(out / "phantom", n_studies=settings["n_studies"], n_test=settings["n_test"], seed=seed,
                        image_size=settings["phantom_size"], workers=None,  # all cores
                        oblique_axial=settings["oblique_axial"], variety=settings["variety"], overwrite=overwrite)
    info = json.loads((root / "phantom_info.json").read_text())

    step("phantom")
    print("[2/6] contrastive pretraining of the dual encoder on (finding crop, severity prompt) pairs")
    pretrained = pretrain_clip({**config, "init_from": None})
    # Its last evaluation is the zero-shot check: the saved encoder scores the severity prompts of
    # every held-out (val) finding crop, cut as it was trained (model.config.roi_side_mm wide),
    # the way zero_shot_classify scores them.
    pre = pretrained["metrics"]
    zero_shot = {"balanced_accuracy": pre["zero_shot_balanced_accuracy"], "accuracy": pre["zero_shot_accuracy"],
                 "chance": 1 / len(SEVERITIES), "n_crops": pre["n_pairs"],
                 "side_mm": pretrained["roi_side_mm"]}

    step("pretrain")
    print("[3/6] detect stage: severity + location training on whole slices")
    trained = train_detect(config)
    fusion_dir = trained["best_dir"] or trained["model_dir"]

    step("detect")
    print("[4/6] later stages: level locator on sagittal slices, text-queried grader on crops of the original slices")
    staged = train_stages({**config, "init_from": str(fusion_dir)})
    model_dir = staged["pipeline_dir"]
    graded = {"history": staged["stages"]["grade"]["history"], "metrics": {
        **staged["stages"]["grade"]["metrics"],
        **{f"locator_{k}": v for k, v in staged["stages"]["locate"]["metrics"].items()}}}

    step("locate+grade")
    print("[5/6] held-out predictions of the whole pipeline, and evaluation")
    store = SeriesStore(root, "test", cache_dir=out / "cache")  # predictions and overlays read each series once
    pipeline = load_pipeline(model_dir)
    result = predict(pipeline, root, split="test", store=store)
    submission, locations = result.submission(), result.locations()
    write_together({report / "submission.csv": submission.to_csv(index=False).encode(),
                    report / "locations.csv": locations.to_csv(index=False).encode()})
    solution = pd.read_csv(root / "solution.csv")
    metrics = evaluate_frames(solution, submission)
    fusion_score = rsna_score(solution, result.submission("detect"))  # the first stage alone, read from the run

    step("predict")
    print("[6/6] report")
    score, prior, oracle = metrics["score"], info["prior_score"], info["oracle_score"]
    gap_closed = (prior - score) / (prior - oracle)
    summary = {"official_score": score, "prior_score": prior, "oracle_score": oracle, "gap_closed": gap_closed,
               "fusion_only_score": fusion_score,
               "zero_shot": zero_shot, "evaluation": metrics, "history": trained["history"],
               "grader": {"history": graded["history"], "val": graded.get("metrics")},
               "settings": settings, "smoke_run": bool(quick), "model_dir": str(model_dir), "seconds": time.perf_counter() - start,
               "step_seconds": seconds}
    write_atomic(report / "metrics.json", json.dumps(summary, indent=2, default=str).encode())
    confusion_matrix_png(metrics["classification"]["confusion_matrix"], report / "confusion_matrix.png",
                         title="held-out phantom studies")
    curves = [{"epoch": h["epoch"], **{k: h[k] for k in ("train_loss", "score") if k in h}} for h in trained["history"]]
    training_curves_png(curves, report / "training_curves.png")
    histories = {"pretrain": pretrained["history"], "detect": trained["history"],
                 **{name: staged["stages"][name]["history"] for name in ("locate", "grade") if name in staged["stages"]}}
    # The held-out (test) studies have no recorded points, as in Kaggle's test split: one validation
    # study (train split, no stage trained on it) shows predicted and recorded points together.
    train_frame, train_store = load_tables(root, "train"), SeriesStore(root, "train", cache_dir=out / "cache")
    val_ids = split_studies(train_frame, config)[1][:1]
    validation = (predict(pipeline, root, split="train", study_ids=val_ids, store=train_store, progress=False),
                  train_store, train_frame) if val_ids else None
    pictures = report_pictures(report, root, result, pipeline, store, solution, load_tables(root, "test"), histories,
                               validation=validation)
    write_report_page(report, summary, pictures)
    overlays = [*pictures["overlays"], *pictures["validation_overlays"]]
    lines = [
        "# spinemm demo report", "",
        *(["**Smoke run** (`--quick`): it checks that every step runs; its numbers say nothing about the model, "
           "and numbers below chance or the prior are expected.", ""] if quick else []),
        f"Held-out phantom studies: {settings['n_test']}. Official score (lower is better):", "",
        "| whole pipeline | detect stage alone | prior only | oracle floor | gap closed |",
        "| --- | --- | --- | --- | --- |",
        f"| {score:.4f} | {fusion_score:.4f} | {prior:.4f} | {oracle:.4f} | {gap_closed:.0%} |", "",
        f"Zero-shot severity prompts on {zero_shot['n_crops']} held-out finding crops "
        f"({zero_shot['side_mm']:g} mm around each label point): balanced accuracy "
        f"{zero_shot['balanced_accuracy']:.3f} (chance {zero_shot['chance']:.3f}).", "",
        *_locator_lines(graded.get("metrics") or {}),
        "```", format_metrics(metrics), "```", "",
        "![confusion matrix](confusion_matrix.png)", "![training curves](training_curves.png)",
        "![every stage's curves](stage_curves.png)",
        *[f"![locations]({p.name})" for p in overlays],
        *([f"![what the grader looked at]({pictures['attention'].name})"] if pictures["attention"] else []),
        "", "The whole report, in order: index.html.",
    ]
    write_atomic(report / "summary.md", ("\n".join(lines) + "\n").encode())
    print(format_metrics(metrics))
    print(f"\nofficial score {score:.4f}   prior-only {prior:.4f}   oracle floor {oracle:.4f}   "
          f"gap closed {gap_closed:.0%}   (fusion model alone {fusion_score:.4f})")
    print(f"zero-shot balanced accuracy {zero_shot['balanced_accuracy']:.3f} (chance {zero_shot['chance']:.3f})")
    for line in filter(None, _locator_lines(graded.get("metrics") or {})):
        print(line)
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    print(f"report: {report}   ({summary['seconds']:.0f} s: {steps})")
    return summary


def _locator_lines(metrics: dict[str, Any]) -> list[str]:
    """The level locator's validation error, when it was trained and there were val slices."""
    median, within = metrics.get("locator_val_median_mm"), metrics.get("locator_val_within_5mm")
    if median is None or not np.isfinite(median):
        return []
    return [f"Level locator on the validation studies' labelled sagittal levels: median error {median:.1f} mm, "
            f"{within:.0%} within 5 mm.", ""]
