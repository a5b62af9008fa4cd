"""The base preset end to end: pretrain -> detect -> locate + grade -> predict -> save -> load.

    python benchmarks/base_presets.py --device cpu --steps 3 --studies 8 --threads 2
    python benchmarks/base_presets.py --device cuda --json base_presets.json      # a GPU machine
    python benchmarks/base_presets.py --dry-run                                    # tiny towers, seconds

Runs the ``spine-vitb16-bert`` preset (open_clip ViT-B/16 + BERT-base) with the recipe config
``recipes/configs/vitb16-bert.yaml``, built offline with random weights: ``vision.pretrained`` null
and a fresh BERT-base-sized text tower (hidden 768, 12 layers, 12 heads, intermediate 3072) with
the library's offline WordPiece tokenizer, both through ``model.kwargs`` overrides, the way the
``spine-tiny`` preset builds its tiny BERT. Every stage trains through the library's own entry
points (``pretrain_clip``, ``train_severity``, ``train_stages``) on a small phantom, one epoch each,
with batch sizes set so that each epoch is about ``--steps`` steps (the later stages' budget is
epochs only); the recipe's image, crop and slice sizes are kept. ``--dry-run`` swaps the towers for
tiny ones and shrinks the sizes, through the same code path.

Prints per stage: seconds per training step (median after the first), peak memory (CUDA: allocated;
CPU: the process's peak resident set, reset per stage where Linux allows), FLOPs per study counted
by ``torch.utils.flop_counter.FlopCounterMode`` (one training step's forward + backward, divided by
the studies in it; forward only for inference), then the GPU budget on paper for the Kaggle
training set: every stage's epochs of the recipe on 1,975 studies, on H100s at 40% MFU.
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
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

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
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def peak_kind(self) -> str:
        if self.device.type == "cuda":
            return "CUDA allocated"
        return "peak RSS" if self.resettable else "process peak RSS"

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"CPU ({os.cpu_count()} cores)"


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
FIT_CALLERS = ("spinemm.training.pretrain", "spinemm.training.loop", "spinemm.training.stage_fit")


class FitProbe(contextlib.AbstractContextManager):
    """While entered, each ``fit`` of the training entry points is measured (:class:`StepClock`,
    peak memory) into :attr:`records`, named by its output folder (pretrain, detect, locate, grade)."""

    def __init__(self, meter: Meter) -> None:
        self.meter, self.records, self._restore = meter, [], []

    def __enter__(self) -> FitProbe:
        for name in FIT_CALLERS:
            module = importlib.import_module(name)
            self._restore.append((module, module.fit))
            module.fit = self._wrap(module.fit)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, fit in self._restore:
            module.fit = fit
        self._restore.clear()

    def _wrap(self, fit: Callable) -> Callable:
        signature = inspect.signature(fit)

        def probed(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            clock = StepClock(self.meter)
            bound.arguments["step_fn"] = clock.step(bound.arguments["step_fn"])
            bound.arguments["eval_fn"] = clock.before(bound.arguments["eval_fn"])
            self.meter.reset_peak()
            try:
                return fit(*bound.args, **bound.kwargs)
            finally:
                clock.stop()
                self.records.append({"stage": Path(bound.arguments["output_dir"]).name, **clock.summary(),
                                     "peak_bytes": self.meter.peak_bytes()})
        return probed


#: (module, class, method, stage): each stage's inference call in ``SpinePipeline.run``.
STAGE_CALLS = (("spinemm.pipeline.detect", "DetectStage", "__call__", "detect"),
               ("spinemm.pipeline.locate", "LocateStage", "run", "locate"),
               ("spinemm.pipeline.grade", "GradeStage", "run", "grade"))


class InferenceProbe(contextlib.AbstractContextManager):
    """While entered, each stage's inference calls are timed and their FLOPs counted (forward only),
    summed per stage in :attr:`seconds` / :attr:`flops`; :attr:`peak_bytes` is the block's peak."""

    def __init__(self, meter: Meter) -> None:
        self.meter, self.flops, self.seconds, self.peak_bytes = meter, {}, {}, 0
        self._restore: list[tuple[type, str, Callable]] = []

    def __enter__(self) -> InferenceProbe:
        for module, cls, method, stage in STAGE_CALLS:
            owner = getattr(importlib.import_module(module), cls)
            self._restore.append((owner, method, getattr(owner, method)))
            setattr(owner, method, self._wrap(getattr(owner, method), stage))
        self.meter.reset_peak()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak_bytes = self.meter.peak_bytes()
        for owner, method, fn in self._restore:
            setattr(owner, method, fn)
        self._restore.clear()

    def _wrap(self, fn: Callable, stage: str) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counter = FlopCounterMode(display=False)
            tic = self.meter.now()
            with counter:
                out = fn(*args, **kwargs)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + self.meter.now() - tic
            self.flops[stage] = self.flops.get(stage, 0) + counter.get_total_flops()
            return out
        return counted


def stage_items(frame: Any, train_ids: list[int]) -> dict[str, int]:
    """Training items of each stage in ``train_ids``: studies (detect), labelled finding crops
    (pretrain pairs, grade crops) and labelled sagittal slices (locate), as the stages count them."""
    from spinemm.data.level_slices import SAGITTAL_CONDITIONS

    rows = frame[frame["study_id"].isin(train_ids) & frame["instance_number"].notna()]
    findings = int((rows["label"] >= 0).sum())
    sagittal = rows[rows["condition"].isin(SAGITTAL_CONDITIONS)]
    slices = sagittal.groupby(["study_id", "series_id", "condition", "instance_number"]).ngroups
    return {"detect": len(train_ids), "pretrain": findings, "grade": findings, "locate": int(slices)}


def run_config(out: Path, root: Path, device: str, steps: int, batches: dict[str, int],
               dry_run: bool) -> dict[str, Any]:
    """The recipe config with the overrides of this run (one epoch a stage, paths under ``out``)."""
    from spinemm.training.config import load_config

    overrides: dict[str, Any] = {
        "output_dir": str(out / "detect"), "init_from": str(out / "pretrain" / "model"),
        "model.kwargs": TINY_TOWERS if dry_run else BASE_TOWERS,
        "data.root": str(root), "data.cache_dir": str(out / "cache"), "data.num_workers": 0,
        "data.batch_size": batches["detect"],
        "train.epochs": 1, "train.max_steps": steps, "train.cpu": device == "cpu",
        "train.mixed_precision": "bf16" if device == "cuda" else "no",
        "checkpoint.every_steps": 10_000, "checkpoint.keep_last": 1,
        "log.tensorboard": False, "log.progress": False,
        "pretrain.output_dir": str(out / "pretrain"), "pretrain.epochs": 1, "pretrain.batch_size": batches["pretrain"],
        "pipeline.output_dir": str(out / "stages"),
        "grader.epochs": 1, "grader.batch_size": batches["grade"], "grader.towers_from": str(out / "pretrain" / "model"),
        "locator.epochs": 1, "locator.batch_size": batches["locate"],
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
        image_size: int = 128, phantom: Path | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Train, predict, save and load the pipeline under ``out``; returns the measurements."""
    import spinemm
    from spinemm.data import make_phantom
    from spinemm.data.tables import load_tables
    from spinemm.pipeline import load_pipeline
    from spinemm.training import pretrain_clip, train_severity, train_stages
    from spinemm.training.common import split_studies

    start = time.perf_counter()
    root = Path(phantom) if phantom is not None else out / "phantom"
    if not (root / "train.csv").is_file():
        make_phantom(root, n_studies=studies, n_test=test_studies, image_size=image_size, seed=0, progress=False)
    probe_config = run_config(out, root, device, steps, dict.fromkeys(TRAIN_STAGES, 1), dry_run)
    train_ids, _ = split_studies(load_tables(root, "train"), probe_config)
    items = stage_items(load_tables(root, "train"), train_ids)
    batches = {name: max(1, math.ceil(n / steps)) for name, n in items.items()}
    config = run_config(out, root, device, steps, batches, dry_run)
    meter = Meter(torch.device(device))
    seconds: dict[str, float] = {}
    with FitProbe(meter) as fits:
        tic = time.perf_counter()
        pretrained = pretrain_clip({**config, "init_from": None})
        seconds["pretrain"] = time.perf_counter() - tic
        tic = time.perf_counter()
        detected = train_severity(config)
        seconds["detect"] = time.perf_counter() - tic
        tic = time.perf_counter()
        staged = train_stages({**config, "init_from": str(detected["best_dir"] or detected["model_dir"])})
        seconds["locate + grade"] = time.perf_counter() - tic
    if pretrained["model_dir"] is None or staged["pipeline_dir"] is None:
        raise RuntimeError("a stage stopped early; nothing to predict with")
    pipeline = load_pipeline(staged["pipeline_dir"])
    n_test = len(load_tables(root, "test")["study_id"].unique())
    with InferenceProbe(meter) as inference:
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
    for record in fits.records:
        name = record["stage"]
        per_study = record["flops"] / record["batch_items"] * items[name] / len(train_ids)
        stages[name] = {**record, "items_per_study": items[name] / len(train_ids), "train_flops_per_study": per_study,
                        "infer_flops_per_study": inference.flops.get(name, 0) / n_test if name in inference.flops
                        else None}
    predict_flops = sum(inference.flops.values()) / n_test
    budget = gpu_budget({k: v["train_flops_per_study"] for k, v in stages.items()}, predict_flops, recipe_epochs())
    return {"device": device, "device_name": meter.device_name(), "dry_run": dry_run, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "studies": studies, "test_studies": n_test,
            "train_studies": len(train_ids), "steps": steps, "batches": batches, "stages": stages,
            "predict": {"seconds": seconds["predict"], "peak_bytes": inference.peak_bytes,
                        "flops_per_study": predict_flops, "stage_seconds": inference.seconds},
            "seconds": seconds, "total_seconds": time.perf_counter() - start, "roundtrip_ok": roundtrip,
            "pipeline_stages": loaded.stages, "budget": budget, "mfu": MFU, "peak_flops": H100_PEAK_FLOPS,
            "kaggle_studies": KAGGLE_STUDIES, "peak_memory": meter.peak_kind()}


def _g(flops: float | None) -> str:
    return "—" if flops is None else f"{flops / 1e9:,.1f}"


def format_tables(results: dict[str, Any]) -> str:
    """The two Markdown tables (per-stage measurements, GPU budget on paper) with their headings."""
    mem = results["peak_memory"]
    lines = [f"spine-vitb16-bert{' (dry run: tiny towers)' if results['dry_run'] else ''} on "
             f"{results['device_name']}, torch {results['torch']}, {results['threads']} threads; "
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
              "(8 GPUs: perfect data-parallel scaling assumed):", "",
              "| stage | epochs | GFLOP/study | PFLOP | hours, 1 H100 | hours, 8 H100 |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in results["budget"]:
        lines.append(f"| {row['stage']} | {row['epochs'] or ''} | {_g(row['flops_per_study'])} | {row['pflop']:,.1f} | "
                     f"{row['h100_hours']:.2f} | {row['h100x8_hours']:.2f} |")
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
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--dry-run", action="store_true", help="tiny towers and sizes, same code path (seconds)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        results = run(out, args.device, args.steps, args.studies, args.test_studies,
                      64 if args.dry_run else args.image_size, args.phantom, args.dry_run)
    results["table"] = format_tables(results)
    print(results["table"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
