"""One GPU check: the train, inference and predict benchmarks and the base preset on CUDA, one table.

    python benchmarks/gpu_check.py --out gpu_check              # a GPU machine: under 8 minutes
    python benchmarks/gpu_check.py --dry-run                    # CPU, tiny sizes, seconds (tests)

Runs, in this order, each in its own process on a GPU (a fresh CUDA context, and predict's workers
are forked from a process that never touched CUDA):

1. ``base_presets.py --device cuda``: the spine-vitb16-bert pipeline trained, run, saved and loaded
   on an 8-study phantom; its saved pipeline feeds step 4;
2. ``train_throughput.py``: LoRA training steps of the ViT-B/16 tower against open_clip + peft;
3. ``inference_throughput.py``: the tower and the detect model against open_clip's tower;
4. ``predict_throughput.py --device cuda``: DICOM to submission with 8 workers feeding the GPU,
   against the bare pydicom decode.

Each benchmark prints its own tables; then one Markdown table, one row per benchmark: what it
measures, its key number, the ratio to its anchor (where it has one) and the seconds it took.
``--budget`` seconds (default 480) bound the whole check: a benchmark still running when they are
spent is stopped and its row says so. ``--dry-run`` runs everything on the CPU at tiny sizes in this
process, with ``torch.compile`` a no-op (compiling on a CPU would take minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

BENCHMARKS = Path(__file__).resolve().parent
BUDGET_S = 480


def load_benchmark(name: str) -> Any:
    """A benchmark script of this folder as a module (its helpers, e.g. ``anchors``, importable)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_key(rows: list[dict]) -> tuple[str, float]:
    ours = rows[2]  # spinemm: Linear attention + LoRA, compiled; rows[0] is the peer (the anchor)
    return f"{ours['slices_per_s']:,.0f} slices/s (LoRA step, ViT tower)", ours["slices_per_s"] / rows[0]["slices_per_s"]


def _inference_key(rows: list[dict]) -> tuple[str, float]:
    tower, detect = rows[1], rows[2]  # rows[0]: open_clip's tower, eager (the anchor)
    return (f"{tower['slices_per_s']:,.0f} slices/s tower; {detect['slices_per_s']:,.0f} slices/s detect model",
            tower["slices_per_s"] / rows[0]["slices_per_s"])


def _predict_key(text: str) -> tuple[str, float]:
    """The first ``| predict, ... |`` row of predict_throughput's table: studies/s and the time
    over the bare decode's (the anchor; 1.0x would be as fast as decoding alone)."""
    row = next(line for line in text.splitlines() if line.startswith("| predict,"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    return f"{float(cells[2]):.1f} studies/s ({cells[0]})", float(cells[4].rstrip("x"))


def _base_key(results: dict[str, Any]) -> tuple[str, None]:
    detect = results["stages"]["detect"]
    hours = results["budget"][-1]
    rate = detect["flops"] / detect["seconds_per_step"]
    mfu = f", {rate / results['peak_flops']:.0%} of H100 bf16 peak" if results["device"] == "cuda" else ""
    return (f"detect step {detect['seconds_per_step']:.2f} s ({rate / 1e12:.1f} TFLOP/s{mfu}); "
            f"Kaggle set on paper {hours['h100_hours']:.3g} h on 1 H100, {hours['h100x8_hours']:.3g} h on 8"), None


def jobs(out: Path, dry_run: bool, phantom: Path | None) -> list[dict[str, Any]]:
    """The benchmarks in order: name, what the row says, arguments, and the key-number reader."""
    pipeline = out / "base" / "saved_pipeline"
    if dry_run:
        throughput = ["--size", "tiny", "--batch", "8", "--steps", "1", "--warmup", "0", "--device", "cpu"]
        base = ["--dry-run", "--device", "cpu", "--steps", "1", "--out", str(out / "base"),
                *(["--phantom", str(phantom)] if phantom else [])]
        predict = [str(pipeline), "--runs", "0:1", "--repeats", "1", "--root", str(phantom or out / "base" / "phantom")]
    else:
        throughput = ["--steps", "5", "--warmup", "3", "--device", "cuda"]
        base = ["--device", "cuda", "--steps", "3", "--studies", "8", "--out", str(out / "base")]
        predict = [str(pipeline), "--device", "cuda", "--runs", "8:1", "--repeats", "1", "--studies", "8"]
    return [
        {"name": "base_presets", "what": "spine-vitb16-bert end to end (pretrain, detect, locate + grade, "
         "predict, save, load)", "args": [*base, "--json", str(out / "base_presets.json")], "key": _base_key},
        {"name": "train_throughput", "what": "LoRA training step, ViT tower, vs open_clip + peft (peer)",
         "args": throughput, "key": _train_key},
        {"name": "inference_throughput", "what": "inference, ViT tower and detect model, vs open_clip's tower",
         "args": throughput, "key": _inference_key},
        {"name": "predict_throughput", "what": "DICOM to submission, vs bare pydicom decode (time ratio)",
         "args": predict, "key": _predict_key},
    ]


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """``torch.compile`` and ``nn.Module.compile`` as no-ops: the dry run's models stay eager."""
    import torch

    def no_compile(fn: Callable | None = None, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    with mock.patch.object(torch, "compile", no_compile), \
            mock.patch.object(torch.nn.Module, "compile", lambda self, *a, **k: None):
        yield


def run_in_process(name: str, args: list[str]) -> Any:
    with eager():
        return load_benchmark(name).main(args)


def run_in_child(name: str, args: list[str], result_file: Path, timeout: float) -> Any:
    """Runs the benchmark in a fresh process (its output goes to this one's); returns its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, str(result_file), *args]
    subprocess.run(cmd, check=True, timeout=timeout)
    return json.loads(result_file.read_text())


def child(name: str, result_file: str, args: list[str]) -> None:
    """The child process: run one benchmark, write what its ``main`` returns as JSON."""
    result = load_benchmark(name).main(args)
    Path(result_file).write_text(json.dumps(result, default=str))


def check(out: Path, dry_run: bool = False, phantom: Path | None = None, budget: float = BUDGET_S) -> list[dict]:
    """Run every benchmark; returns one row per benchmark (what, key, ratio, seconds, status)."""
    out.mkdir(parents=True, exist_ok=True)
    start, rows = time.perf_counter(), []
    for job in jobs(out, dry_run, phantom):
        left = budget - (time.perf_counter() - start)
        row = {"name": job["name"], "what": job["what"], "key": "", "ratio": None, "status": "ok"}
        tic = time.perf_counter()
        if left <= 0:
            row["status"] = "skipped: budget spent"
        else:
            print(f"\n## {job['name']} {' '.join(job['args'])}\n", flush=True)
            try:
                result = run_in_process(job["name"], job["args"]) if dry_run else \
                    run_in_child(job["name"], job["args"], out / f"{job['name']}.result.json", left)
                row["key"], row["ratio"] = job["key"](result)
                if isinstance(result, dict) and "device_name" in result:
                    row["device_name"] = result["device_name"]
            except subprocess.TimeoutExpired:
                row["status"] = f"stopped: over the {budget:.0f} s budget"
            except (subprocess.CalledProcessError, StopIteration, KeyError, IndexError, ValueError) as exc:
                row["status"] = f"failed: {type(exc).__name__}: {exc}"
        row["seconds"] = time.perf_counter() - tic
        rows.append(row)
    return rows


def format_table(rows: list[dict], device: str) -> str:
    total = sum(r["seconds"] for r in rows)
    device = next((r["device_name"] for r in rows if "device_name" in r), device)
    lines = [f"GPU check on {device}: {total:.0f} s in all", "",
             "| benchmark | what | key number | vs anchor | s | status |",
             "| --- | --- | --- | ---: | ---: | --- |"]
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['name']} | {r['what']} | {r['key']} | {ratio} | {r['seconds']:.0f} | {r['status']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2], argv[3:])
        return {}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the runs and results (default: a temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, in this process, no compiling")
    parser.add_argument("--phantom", type=Path, help="dry run: an existing phantom to use")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    parser.add_argument("--markdown", type=Path, help="write the summary table here")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU smoke run")
    device = "CPU (dry run)" if args.dry_run else "CUDA"  # the parent never initialises CUDA
    with tempfile.TemporaryDirectory() as tmp:
        rows = check(args.out or Path(tmp), args.dry_run, args.phantom, args.budget)
    table = format_table(rows, device)
    print("\n" + table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return {"rows": rows, "table": table, "device": device}


if __name__ == "__main__":
    main()
