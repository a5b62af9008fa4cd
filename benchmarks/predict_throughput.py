"""Predict throughput from DICOM on disk to submission rows, against a bare pydicom decode loop.

    python benchmarks/predict_throughput.py PIPELINE_DIR [--root ROOT] [--studies 8] [--runs 0:1 1:1 2:1]

Makes (or reuses, ``--root``) a phantom of real size: 512 px, sagittal series of 12-18 slices and
axial ones of 30-50 (6-10 per level; the same as ``spinemm phantom ROOT --n-studies 2 --n-test 8
--image-size 512 --axial-slices 6 10 --seed 7``). It loads the pipeline once (load time excluded),
warms the page cache, then times, best of ``--repeats`` and in alternation:

* the anchor: ``pydicom.dcmread(f).pixel_array`` over every test file, one core; and for each
  worker run of N > 1 processes, the same loop split between N forked processes, which says how
  far this machine's cores scale plain decoding (the ceiling for predict's scaling);
* ``spinemm.predict`` plus writing ``submission.csv`` and ``locations.csv``, once per ``--runs``
  entry ``WORKERS:THREADS``: worker processes, each single-threaded and predicting a share of the
  studies from its DICOM files (``predict(workers=N)``; 0: the main process alone), and the main
  process's torch threads (``0:1`` is one core: decode, preprocessing and models in one thread).
  With ``--device cuda`` the workers run the models on the GPU (worker runs only).

and prints one Markdown table: studies/s, files/s, the ratio to the bare decode, and the share of
the single-core run spent in decode (windowing included: one pass), the first stage's
preprocessing, each stage's model and writing (exclusive times: a part nested in another counts
once, in the inner part).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import torch

import spinemm
from spinemm.data import dataset as dataset_module
from spinemm.data import dicom
from spinemm.pipeline import detect, grade, locate

REAL_AXIAL_SLICES = (6, 10)  # per level: 30-50 slices a series, as in the RSNA studies

# (module, attribute, part): the functions whose exclusive time makes up each part of a run
PARTS = (
    (dicom, "read_series", "decode + window"),  # one pass: stored pixels -> float16 in [0, 1]
    (dataset_module.SpineDataset, "__getitem__", "preprocess"),
    (detect.DetectStage, "predict_batch", "detect model"),
    (locate.LocateStage, "locate", "locate"),
    (grade.GradeStage, "_cut", "grade crops"),
    (grade.GradeStage, "grade", "grade model"),
)


class ExclusiveTimer:
    """Wraps functions so each call's time goes to its part, minus the time of parts nested in it."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self._stack: list[float] = []  # time spent in nested parts, one entry per open call

    def wrap(self, fn: Callable, part: str) -> Callable:
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            tic = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - tic
                nested = self._stack.pop()
                self.seconds[part] += spent - nested
                if self._stack:
                    self._stack[-1] += spent
        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[ExclusiveTimer]:
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in PARTS]
        for owner, name, part in PARTS:
            setattr(owner, name, self.wrap(getattr(owner, name), part))
        try:
            yield self
        finally:
            for owner, name, fn in originals:
                setattr(owner, name, fn)


def _decode_all(files: list[Path]) -> None:
    for path in files:
        pydicom.dcmread(path).pixel_array  # noqa: B018 (the decode is the point)


def bare_decode(files: list[Path], workers: int = 0) -> float:
    """Seconds to decode ``files``: in this process, or split between ``workers`` forked processes
    (forking included, as in ``predict(workers=N)``): what this machine's cores give plain decoding."""
    tic = time.perf_counter()
    if workers:  # forked processes run the function they inherit: nothing is pickled
        processes = [multiprocessing.get_context("fork").Process(target=_decode_all, args=(files[i::workers],))
                     for i in range(workers)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        if any(process.exitcode for process in processes):
            raise RuntimeError(f"a decode process failed (exit codes {[p.exitcode for p in processes]})")
    else:
        _decode_all(files)
    return time.perf_counter() - tic


def predict_once(pipeline: spinemm.SpinePipeline, root: Path, out: Path, workers: int, device: str = "cpu") -> float:
    tic = time.perf_counter()
    result = spinemm.predict(pipeline, root, split="test", progress=False, workers=workers, device=device)
    result.submission().to_csv(out / "submission.csv", index=False)
    result.locations().to_csv(out / "locations.csv", index=False)
    return time.perf_counter() - tic


def _run_spec(text: str) -> tuple[int, int]:
    workers, _, threads = text.partition(":")
    return int(workers), int(threads or 1)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", help="a pipeline folder (e.g. demo_out/pipeline) or model name")
    parser.add_argument("--root", type=Path, help="an RSNA-layout folder with test studies (made when missing)")
    parser.add_argument("--studies", type=int, default=8, help="test studies of the phantom made")
    parser.add_argument("--runs", nargs="+", default=[(0, 1), (1, 1), (2, 1)], type=_run_spec,
                        help="WORKERS:THREADS pairs to time: decode worker processes and the main process's torch "
                             "threads (0:1 is one core)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (best is kept)")
    parser.add_argument("--device", default="cpu", help="where the models run (cuda: each worker moves its own "
                        "copy there; the timed rows then show decode on the CPUs feeding the GPU)")
    parser.add_argument("--compile", action="store_true", help="every stage's model under torch.compile "
                        "(SpinePipeline.compile; compiling happens in the untimed first pass)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp, "phantom")
        if not (root / "test_images").is_dir():
            spinemm.data.make_phantom(root, n_studies=2, n_test=args.studies, image_size=512, seed=7,
                                      axial_slices=REAL_AXIAL_SLICES)
        files = sorted(Path(root, "test_images").rglob("*.dcm"))
        n_studies = len([p for p in (root / "test_images").iterdir() if p.is_dir()])
        pipeline = spinemm.load_pipeline(args.pipeline)
        if args.compile:
            pipeline.compile(dynamic=True)  # batch sizes vary (the last batch, the grader's chunks)
        out = Path(tmp)

        torch.set_num_threads(1)
        bare_decode(files)  # untimed: warms the page cache
        # On a GPU the calling process must not touch CUDA before forking workers: worker runs only
        on_gpu = args.device != "cpu"
        if on_gpu and any(workers == 0 for workers, _ in args.runs):
            raise SystemExit("--device cuda: time worker runs only (e.g. --runs 8:1 16:1)")
        # untimed: warms the page cache and allocator (and compiles, with --compile)
        predict_once(pipeline, root, out, args.runs[0][0] if on_gpu else 0, args.device)
        best: dict[tuple[int, int], float] = {}
        # the anchor on 1 core, and on as many worker processes as each worker run uses
        anchor_workers = sorted({0} | {workers for workers, _ in args.runs if workers > 1})
        anchors = dict.fromkeys(anchor_workers, float("inf"))
        for _ in range(args.repeats):  # alternate, so drift on a shared machine hits every row alike
            torch.set_num_threads(1)
            for workers in anchor_workers:
                anchors[workers] = min(anchors[workers], bare_decode(files, workers))
            for workers, threads in args.runs:
                torch.set_num_threads(threads)
                seconds = predict_once(pipeline, root, out, workers, args.device)
                best[workers, threads] = min(best.get((workers, threads), float("inf")), seconds)
        bare = anchors[0]
        torch.set_num_threads(1)
        timer, reads, single = ExclusiveTimer(), collections.Counter(), 0.0
        real_dcmread = pydicom.dcmread

        def counting(path, *args, **kwargs):
            reads[str(path)] += 1
            return real_dcmread(path, *args, **kwargs)

        pydicom.dcmread = counting
        try:
            if not on_gpu:
                with timer.installed():
                    single = predict_once(pipeline, root, out, 0, args.device)
        finally:
            pydicom.dcmread = real_dcmread

    lines = [f"{n_studies} studies, {len(files)} files ({len(files) / n_studies:.0f} per study), 512 px; "
             f"bare decode {bare:.2f} s ({len(files) / bare:.0f} files/s, 1 core)", "",
             "| run | s | studies/s | files/s | / bare decode | vs 1 core |", "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| bare pydicom decode (anchor) | {bare:.2f} | {n_studies / bare:.1f} | {len(files) / bare:.0f} | 1.0x | |"]
    for workers in anchor_workers[1:]:  # how far this machine's cores scale plain decoding
        seconds = anchors[workers]
        lines.append(f"| bare decode, {workers} processes | {seconds:.2f} | {n_studies / seconds:.1f} | "
                     f"{len(files) / seconds:.0f} | {seconds / bare:.1f}x | {bare / seconds:.2f}x |")
    base = best.get((0, 1))
    for (workers, threads), seconds in best.items():
        label = "predict, 1 core" if (workers, threads) == (0, 1) else \
            f"predict, {workers} workers" if workers else f"predict, {threads} threads"
        speedup = f"{base / seconds:.2f}x" if base and (workers, threads) != (0, 1) else ""
        lines.append(f"| {label} | {seconds:.2f} | {n_studies / seconds:.1f} | {len(files) / seconds:.0f} | "
                     f"{seconds / bare:.1f}x | {speedup} |")
    if not single:
        text = "\n".join(lines)
        print(text)
        return text
    lines += ["", f"Where the 1-core run's time goes (one instrumented pass, {single:.2f} s; "
              f"{sum(reads.values()) / len(files):.1f} dcmread calls per file):", "",
              "| part | s | share |", "| --- | ---: | ---: |"]
    rest = single - sum(timer.seconds.values())
    for part, seconds in [*timer.seconds.most_common(), ("other (collate, findings, writing)", rest)]:
        lines.append(f"| {part} | {seconds:.3f} | {seconds / single:.0%} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
