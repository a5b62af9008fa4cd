"""Predict time and DICOM reads per file against a bare pydicom decode loop over the same files.

    python benchmarks/predict_reads.py LABEL MODEL_OR_PIPELINE_DIR ROOT

Prints one Markdown table row: files, predict seconds (best of 2, model load excluded), bare
``pydicom.dcmread(f).pixel_array`` seconds (best of 2), their ratio, and ``dcmread`` calls per file
during predict. Make a real-size root with ``spinemm phantom ROOT --n-studies 2 --n-test 8
--image-size 512``. (Issue 13 turns this into the full throughput benchmark.)
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

import pydicom

import spinemm


def main(argv: list[str] | None = None) -> str:
    label, model_dir, root = (argv if argv is not None else sys.argv[1:])[:3]
    files = sorted(Path(root, "test_images").rglob("*.dcm"))
    real = pydicom.dcmread

    def decode() -> float:
        tic = time.perf_counter()
        for path in files:
            real(path).pixel_array  # noqa: B018 (the decode is the point)
        return time.perf_counter() - tic

    bare = decode()
    model = spinemm.load_pipeline(model_dir)
    reads: collections.Counter = collections.Counter()

    def counting(path, *args, **kwargs):
        reads[str(path)] += 1
        return real(path, *args, **kwargs)

    pydicom.dcmread = counting
    try:
        best = float("inf")
        for _ in range(2):
            reads.clear()
            tic = time.perf_counter()
            spinemm.predict(model, root, split="test", progress=False)
            best = min(best, time.perf_counter() - tic)
    finally:
        pydicom.dcmread = real
    bare = min(bare, decode())
    row = (f"| {label} | {len(files)} | {best:.2f} | {bare:.2f} | {best / bare:.1f}x | "
           f"{sum(reads.values()) / len(files):.1f} |")
    print(row)
    return row


if __name__ == "__main__":
    main()
