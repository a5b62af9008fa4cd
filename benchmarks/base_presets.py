"""The base preset end to end: pretrain -> detect -> locate + grade -> predict -> save -> load.

    python benchmarks/base_presets.py --device cpu --steps 6 --threads 2 --json base_presets.json
    python benchmarks/base_presets.py --device cuda                  # a GPU machine
    python benchmarks/base_presets.py --dry-run                      # tiny towers, seconds

``spine-vitb16-bert`` (open_clip ViT-B/16 + BERT-base) with ``recipes/configs/vitb16-bert.yaml``,
offline with random weights: ``vision.pretrained`` null and a fresh BERT-base-sized text tower (768
wide, 12 layers, 12 heads, intermediate 3072) on the library's offline WordPiece vocabulary, through
``model.kwargs`` as the ``spine-tiny`` preset builds its BERT. Every stage trains through the
library's entry points (``pretrain_clip``, ``train_detect``, ``train_stages``) on a small
phantom for one epoch, its batch size set so the epoch is at most ``--steps`` steps (the later
stages' budget is epochs only); the recipe's image, crop and slice sizes are kept. ``--dry-run``
swaps in tiny towers and sizes on the same code path.

Per stage: seconds per training step (median after the first), peak memory (CUDA: allocated; CPU:
peak resident set, reset per stage where Linux allows) and FLOPs per study by
``torch.utils.flop_counter.FlopCounterMode`` (a training step's forward + backward over the studies
in it; forward only for inference). Then the GPU budget on paper: the recipe's epochs of every
stage on the 1,975 Kaggle training studies, on H100s at 40% MFU.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "vitb16-bert.yaml"
KAGGLE_STUDIES = 1975
H100_PEAK_FLOPS = 989e12  # dense bf16
MFU = 0.40
TRAIN_STAGES = ("pretrain", "detect", "locate", "grade")

#: The preset's towers, offline and randomly initialised: no open_clip tag, and a fresh BERT-base
#: with the offline WordPiece tokenizer (no hub name), as the tiny preset builds its tiny BERT.
BASE_TOWERS: dict[str, Any] = {"vision.pretrained": None, "text.hf_model_name": None, "text.width": 768,
                               "text.layers": 12, "text.heads": 12, "text.intermediate_size": 3072}
#: --dry-run: tiny towers of the same kinds (open_clip ViT, fresh BERT) and small inputs.
TINY_TOWERS: dict[str, Any] = {
    **BASE_TOWERS, "embed_dim": 64, "text.width": 64, "text.layers": 2, "text.heads": 2,
    "text.intermediate_size": 128, "text.max_length": 32,
    "vision.open_clip_cfg": {"embed_dim": 64, "quick_gelu": False, "vision_cfg": {
        "width": 64, "layers": 2, "head_width": 32, "patch_size": 8, "mlp_ratio": 2.0}},
}
TINY_SIZES: dict[str, Any] = {"data.image_size": 32, "data.num_slices": 4, "pretrain.crop_size": 32,
                              "grader.model.size": 32, "locator.model.size": 64,
                              "locator.model.channels": [8, 8, 16, 16, 16]}


class Meter:
    """Wall clock synchronised with the device, and the peak memory since :meth:`reset_peak`: CUDA's
    allocated bytes, or on a CPU the process's peak resident set (``VmHWM``, which writing 5 to
    ``/proc/self/clear_refs`` resets; where it cannot, the peak since the process started)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.resettable = device, device.type == "cuda"

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.resettable = False
        with contextlib.suppress(OSError):
            self.resettable = Path("/proc/self/clear_refs").write_text("5") == 1

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def peak_kind(self) -> str:
        return "CUDA allocated" if self.device.type == "cuda" else "peak RSS" if self.resettable else "process peak RSS"

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def _batch_items(batch: dict[str, Any]) -> int:
    """Items in a training batch: the leading size of its first image-like tensor."""
    return next(int(v.shape[0]) for v in batch.values() if torch.is_tensor(v) and v.ndim >= 3)


class StepClock:
    """Times the steps of one ``fit``: a step runs from its ``step_fn`` call to the next one's, or to
    the evaluation that ends the epoch (backward, optimizer and the next batch's loading included).
    The first step's FLOPs (forward, backward, optimizer) are counted on the way."""

    def __init__(self, meter: Meter) -> None:
        self.meter, self.times, self.flops, self.batch_items = meter, [], 0, 0
        self._tic: float | None = None
        self._counter: FlopCounterMode | None = None

    def stop(self) -> None:
        if self._tic is not None:
            self.times.append(self.meter.now() - self._tic)
            self._tic = None
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops, self._counter = self._counter.get_total_flops(), None

    def step(self, step_fn: Callable) -> Callable:
        def timed(model: torch.nn.Module, batch: dict[str, Any]) -> Any:
            self.stop()
            if not self.times:
                self.batch_items = _batch_items(batch)
                self._counter = FlopCounterMode(display=False)
                self._counter.__enter__()
            self._tic = self.meter.now()
            return step_fn(model, batch)
        return timed

    def before(self, eval_fn: Callable) -> Callable:
        def evaluated(*args: Any, **kwargs: Any) -> Any:
            self.stop()
            return eval_fn(*args, **kwargs)
        return evaluated

    def summary(self) -> dict[str, Any]:
        timed = self.times[1:] or self.times
        return {"steps": len(self.times), "step_seconds": self.times, "flops": self.flops,
                "batch_items": self.batch_items,
                "seconds_per_step": sorted(timed)[len(timed) // 2] if timed else math.nan}


#: The modules whose ``fit`` (spinemm.training.engine.fit, imported by name) the entry points call.
FIT_CALLERS = ("spinemm.training.pretrain", "spinemm.training.detect", "spinemm.training.stage_fit")
#: (module, class, method, stage): each stage's inference call in ``SpinePipeline.run``.
STAGE_CALLS = (("spinemm.pipeline.detect", "DetectStage", "run", "detect"),
               ("spinemm.pipeline.locate", "LocateStage", "run", "locate"),
               ("spinemm.pipeline.grade", "GradeStage", "run", "grade"))


@contextlib.contextmanager
def fit_probe(meter: Meter) -> Iterator[list[dict[str, Any]]]:
    """Within the block, each ``fit`` the training entry points run is measured (:class:`StepClock`,
    peak memory) into the list yielded, named by its output folder (pretrain, detect, locate, grade)."""
    records: list[dict[str, Any]] = []

    def probe(fit: Callable) -> Callable:
        signature = inspect.signature(fit)

        def probed(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            clock = StepClock(meter)
            bound.arguments["step_fn"] = clock.step(bound.arguments["step_fn"])
            bound.arguments["eval_fn"] = clock.before(bound.arguments["eval_fn"])
            meter.reset_peak()
            try:
                return fit(*bound.args, **bound.kwargs)
            finally:
                clock.stop()
                records.append({"stage": Path(bound.arguments["output_dir"]).name, **clock.summary(),
                                "dataset_items": len(bound.arguments["train_loader"].dataset),
                                "peak_bytes": meter.peak_bytes()})
        return probed

    with contextlib.ExitStack() as stack:
        for name in FIT_CALLERS:
            module = importlib.import_module(name)
            stack.enter_context(mock.patch.object(module, "fit", probe(module.fit)))
        yield records


@contextlib.contextmanager
def inference_probe(meter: Meter) -> Iterator[dict[str, Any]]:
    """Within the block, each stage's inference calls are timed and their FLOPs counted (forward
    only), summed per stage in the yielded ``["seconds"]`` / ``["flops"]``; ``["peak_bytes"]``: the block's."""
    totals: dict[str, Any] = {"seconds": {}, "flops": {}, "peak_bytes": 0}

    def count(fn: Callable, stage: str) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counter = FlopCounterMode(display=False)
            tic = meter.now()
            with counter:
                out = fn(*args, **kwargs)
            totals["seconds"][stage] = totals["seconds"].get(stage, 0.0) + meter.now() - tic
            totals["flops"][stage] = totals["flops"].get(stage, 0) + counter.get_total_flops()
            return out
        return counted

    with contextlib.ExitStack() as stack:
        for module, cls, method, stage in STAGE_CALLS:
            owner = getattr(importlib.import_module(module), cls)
            stack.enter_context(mock.patch.object(owner, method, count(getattr(owner, method), stage)))
        meter.reset_peak()
        yield totals
        totals["peak_bytes"] = meter.peak_bytes()


def stage_items(frame: Any, train_ids: list[int]) -> dict[str, int]:
    """Training items of each stage in ``train_ids``: studies (detect), labelled finding crops
    (pretrain pairs, grade crops) and labelled sagittal slices (locate), as the stages count them."""
    from spinemm.data.level_slices import SAGITTAL_CONDITIONS

    rows = frame[frame["study_id"].isin(train_ids) & frame["instance_number"].notna()]
    findings = int((rows["label"] >= 0).sum())
    sagittal = rows[rows["condition"].isin(SAGITTAL_CONDITIONS)]
    slices = sagittal.groupby(["study_id", "series_id", "condition", "instance_number"]).ngroups
    return {"detect": len(train_ids), "pretrain": findings, "grade": findings, "locate": int(slices)}


def run_config(out: Path, root: Path, device: str, steps: int, batches: dict[str, int], folds: int,
               dry_run: bool, precision: str = "bf16") -> dict[str, Any]:
    """The recipe config with the overrides of this run (one epoch a stage, paths under ``out``)."""
    from spinemm.training.config import load_config

    overrides: dict[str, Any] = {
        "output_dir": str(out / "detect"), "init_from": str(out / "pretrain" / "model"),
        "model.kwargs": TINY_TOWERS if dry_run else BASE_TOWERS,
        "data.root": str(root), "data.cache_dir": str(out / "cache"), "data.num_workers": 0,
        "data.batch_size": batches.get("detect", 1), "split.folds": folds,
        "train.epochs": 1, "train.max_steps": steps, "train.cpu": device == "cpu",
        "train.mixed_precision": precision,
        "checkpoint.every_steps": 10_000, "checkpoint.keep_last": 1,
        "log.tensorboard": False, "log.progress": False,
        "pretrain.output_dir": str(out / "pretrain"), "pretrain.epochs": 1, "pretrain.batch_size": batches.get("pretrain", 1),
        "pipeline.output_dir": str(out / "stages"),
        "grader.epochs": 1, "grader.batch_size": batches.get("grade", 1), "grader.towers_from": str(out / "pretrain" / "model"),
        "locator.epochs": 1, "locator.batch_size": batches.get("locate", 1),
        **(TINY_SIZES if dry_run else {}),
    }
    return load_config(RECIPE, list(overrides.items()))


def recipe_epochs() -> dict[str, int]:
    """Each stage's epochs in the recipe config, for the budget on paper."""
    from spinemm.training.config import load_config

    recipe = load_config(RECIPE)
    return {"pretrain": int(recipe["pretrain"]["epochs"] or recipe["train"]["epochs"]),
            "detect": int(recipe["train"]["epochs"]), "locate": int(recipe["locator"]["epochs"]),
            "grade": int(recipe["grader"]["epochs"])}


def pipeline_tensors(pipeline: Any) -> dict[str, torch.Tensor]:
    """Every weight and buffer of a pipeline's stages, on the CPU, by stage-prefixed name."""
    tensors = {f"detect.{k}": v for k, v in pipeline.detect.model.state_dict().items()}
    for name in ("locate", "grade"):
        stage = getattr(pipeline, name)
        if stage is not None:
            tensors.update({f"{name}.{k}": v for k, v in stage.state_dict().items()})
    return {k: v.detach().cpu() for k, v in tensors.items()}


def gpu_budget(train: dict[str, float], predict: float, epochs: dict[str, int]) -> list[dict[str, Any]]:
    """Hours on 1 and 8 H100s at :data:`MFU` for ``epochs`` of each stage over the Kaggle training set,
    plus one forward pass of the pipeline over it. ``train`` / ``predict``: FLOPs per study."""
    rate = MFU * H100_PEAK_FLOPS
    rows = [{"stage": name, "epochs": epochs[name], "flops_per_study": train[name]} for name in TRAIN_STAGES]
    rows.append({"stage": "predict (forward, all stages)", "epochs": 1, "flops_per_study": predict})
    for row in rows:
        row["pflop"] = row["flops_per_study"] * row["epochs"] * KAGGLE_STUDIES / 1e15
        row["h100_hours"] = row["pflop"] * 1e15 / rate / 3600
        row["h100x8_hours"] = row["h100_hours"] / 8
    total = {"stage": "total", "epochs": None, "flops_per_study": None,
             **{k: sum(r[k] for r in rows) for k in ("pflop", "h100_hours", "h100x8_hours")}}
    return [*rows, total]


def run(out: Path, device: str = "cpu", steps: int = 3, studies: int = 8, test_studies: int = 2,
        image_size: int = 128, phantom: Path | None = None, dry_run: bool = False,
        precision: str = "bf16") -> dict[str, Any]:
    """Train, predict, save and load the pipeline under ``out``; returns the measurements."""
    import spinemm
    from spinemm.data import make_phantom
    from spinemm.data.tables import load_tables
    from spinemm.pipeline import load_pipeline
    from spinemm.training import pretrain_clip, train_detect, train_stages
    from spinemm.training.common import split_studies

    start = time.perf_counter()
    root = Path(phantom) if phantom is not None else out / "phantom"
    if not (root / "train.csv").is_file():
        make_phantom(root, n_studies=studies, n_test=test_studies, image_size=image_size, seed=0, progress=False)
    frame = load_tables(root, "train")
    folds = min(5, frame["study_id"].nunique())  # the recipe's 5 folds need 5 studies
    train_ids, _ = split_studies(frame, run_config(out, root, device, steps, {}, folds, dry_run))
    items = stage_items(frame, train_ids)
    batches = {name: max(1, math.ceil(n / steps)) for name, n in items.items()}
    config = run_config(out, root, device, steps, batches, folds, dry_run, precision)
    meter = Meter(torch.device(device))
    seconds: dict[str, float] = {}
    with fit_probe(meter) as fits:
        tic = time.perf_counter()
        pretrained = pretrain_clip({**config, "init_from": None})
        seconds["pretrain"] = time.perf_counter() - tic
        tic = time.perf_counter()
        detected = train_detect(config)
        seconds["detect"] = time.perf_counter() - tic
        tic = time.perf_counter()
        staged = train_stages({**config, "init_from": str(detected["best_dir"] or detected["model_dir"])})
        seconds["locate + grade"] = time.perf_counter() - tic
    if pretrained["model_dir"] is None or staged["pipeline_dir"] is None:
        raise RuntimeError("a stage stopped early; nothing to predict with")
    pipeline = load_pipeline(staged["pipeline_dir"])
    n_test = len(load_tables(root, "test")["study_id"].unique())
    with inference_probe(meter) as inference:
        tic = time.perf_counter()
        result = spinemm.predict(pipeline, root, split="test", device=device, progress=False)
        seconds["predict"] = time.perf_counter() - tic
    submission = result.submission()
    if len(submission) != 25 * n_test or not submission.iloc[:, 1:].notna().all().all():
        raise RuntimeError(f"predict gave {len(submission)} rows for {n_test} test studies (or NaNs)")
    tic = time.perf_counter()
    pipeline.save_pretrained(out / "saved_pipeline")
    loaded = load_pipeline(out / "saved_pipeline")
    seconds["save + load"] = time.perf_counter() - tic
    before, after = pipeline_tensors(pipeline), pipeline_tensors(loaded)
    roundtrip = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    if not roundtrip:
        raise RuntimeError("the loaded pipeline's weights differ from the saved ones")

    stages = {}
    for record in fits:  # FLOPs of a step / its items * the stage's items per training study
        per_study = record["dataset_items"] / len(train_ids)
        infer = inference["flops"].get(record["stage"])
        stages[record["stage"]] = {**record, "items_per_study": per_study,
                                   "train_flops_per_study": record["flops"] / record["batch_items"] * per_study,
                                   "infer_flops_per_study": None if infer is None else infer / n_test}
    predict_flops = sum(inference["flops"].values()) / n_test
    budget = gpu_budget({k: v["train_flops_per_study"] for k, v in stages.items()}, predict_flops, recipe_epochs())
    return {"device": device, "device_name": meter.device_name(), "dry_run": dry_run, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "precision": precision, "studies": len(frame["study_id"].unique()), "test_studies": n_test,
            "train_studies": len(train_ids), "steps": steps, "batches": batches, "stages": stages,
            "predict": {"seconds": seconds["predict"], "peak_bytes": inference["peak_bytes"],
                        "flops_per_study": predict_flops, "stage_seconds": inference["seconds"]},
            "seconds": seconds, "total_seconds": time.perf_counter() - start, "roundtrip_ok": roundtrip,
            "pipeline_stages": loaded.stage_names, "budget": budget, "mfu": MFU, "peak_flops": H100_PEAK_FLOPS,
            "kaggle_studies": KAGGLE_STUDIES, "peak_memory": meter.peak_kind()}


def _g(flops: float | None) -> str:
    """FLOPs as GFLOP: 3 significant figures below 100, whole numbers above."""
    if flops is None:
        return "—"
    return f"{flops / 1e9:,.0f}" if flops >= 1e11 else f"{flops / 1e9:.3g}"


def _h(hours: float) -> str:
    return f"{hours:.3f} ({hours * 60:.1f} min)"


def format_tables(results: dict[str, Any]) -> str:
    """The two Markdown tables (per-stage measurements, GPU budget on paper) with their headings."""
    mem = results["peak_memory"]
    lines = [f"spine-vitb16-bert{' (dry run: tiny towers)' if results['dry_run'] else ''} on "
             f"{results['device_name']}, torch {results['torch']}, {results['threads']} threads, "
             f"mixed precision {results['precision']}; "
             f"{results['studies']} phantom studies ({results['train_studies']} train, {results['test_studies']} test), "
             f"one epoch a stage of at most {results['steps']} steps", "",
             f"| stage | items/step | steps | s/step | stage s (wall) | peak memory ({mem}) | "
             "train GFLOP/study | inference GFLOP/study | TFLOP/s in the step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    wall = results["seconds"]
    for name in TRAIN_STAGES:
        s = results["stages"][name]
        stage_wall = wall.get(name, wall.get("locate + grade"))
        rate = s["flops"] / s["seconds_per_step"] / 1e12
        lines.append(f"| {name} | {s['batch_items']} | {s['steps']} | {s['seconds_per_step']:.2f} | "
                     f"{stage_wall:.0f}{'*' if name in ('locate', 'grade') else ''} | "
                     f"{s['peak_bytes'] / 2**30:.2f} GiB | {_g(s['train_flops_per_study'])} | "
                     f"{_g(s['infer_flops_per_study'])} | {rate:.2f} |")
    p = results["predict"]
    lines += [f"| predict ({results['test_studies']} studies) | | | | {p['seconds']:.1f} | "
              f"{p['peak_bytes'] / 2**30:.2f} GiB | | {_g(p['flops_per_study'])} | |", "",
              "s/step: median after the first step (the first alone when there is one); * locate + grade "
              f"together. save + load {wall['save + load']:.1f} s, weights identical: {results['roundtrip_ok']}.",
              "", f"GPU budget on paper: the recipe's epochs on {results['kaggle_studies']:,} Kaggle studies, "
              f"H100 dense bf16 {results['peak_flops'] / 1e12:.0f} TFLOP/s at {results['mfu']:.0%} MFU "
              "(8 GPUs: perfect data-parallel scaling assumed; the models' FLOPs only, not decoding or "
              "evaluation):", "",
              "| stage | epochs | GFLOP/study | PFLOP | hours, 1 H100 | hours, 8 H100 |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in results["budget"]:
        lines.append(f"| {row['stage']} | {row['epochs'] or ''} | {_g(row['flops_per_study'])} | {row['pflop']:,.1f} | "
                     f"{_h(row['h100_hours'])} | {_h(row['h100x8_hours'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="steps per stage (one epoch; batch sizes follow)")
    parser.add_argument("--studies", type=int, default=8, help="train studies of the phantom made")
    parser.add_argument("--test-studies", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128, help="phantom pixels")
    parser.add_argument("--phantom", type=Path, help="an RSNA-layout folder to use (a phantom is made there if empty)")
    parser.add_argument("--out", type=Path, help="run folder (default: a temporary one, removed after)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--precision", choices=["bf16", "no"],
                        help="train.mixed_precision (default: the recipe's bf16; no for --dry-run)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--dry-run", action="store_true", help="tiny towers and sizes, same code path (seconds)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        results = run(out, args.device, args.steps, args.studies, args.test_studies,
                      64 if args.dry_run else args.image_size, args.phantom, args.dry_run,
                      args.precision or ('no' if args.dry_run else 'bf16'))
    results["table"] = format_tables(results)
    print(results["table"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
