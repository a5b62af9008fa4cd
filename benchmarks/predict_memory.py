"""Peak memory and reads per file of predict as the number of studies grows (real-variety studies).

    python benchmarks/predict_memory.py PIPELINE --root heldout_sets/test-240-seed99-kaggle --studies 50 200

Each size runs in a fresh process (so its peak resident memory is its own): ``spinemm.predict`` on
the first N test studies of ``--root``, one thread, with ``pydicom.dcmread`` counted per file. The
table gives seconds per study, peak RSS, its ratio to the smallest run's (flat memory: close to
1.0x whatever N), dcmread calls per file (1.0: each file opened once) and the largest series read.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(pipeline: str, root: str, n: int) -> dict:
    """One predict over the first ``n`` test studies; what it cost."""
    import pandas as pd
    import pydicom
    import torch

    import spinemm

    torch.set_num_threads(1)
    ids = sorted(int(s) for s in pd.read_csv(Path(root) / "test_series_descriptions.csv").study_id.unique())[:n]
    model = spinemm.load_pipeline(pipeline)
    reads: collections.Counter = collections.Counter()
    real_dcmread = pydicom.dcmread

    def counting(path, *args, **kwargs):
        reads[str(path)] += 1
        return real_dcmread(path, *args, **kwargs)

    pydicom.dcmread = counting
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tic = time.perf_counter()
    result = spinemm.predict(model, root, "test", study_ids=ids, progress=False)
    seconds = time.perf_counter() - tic
    files = [f for s in ids for f in (Path(root) / "test_images" / str(s)).glob("*/*.dcm")]
    out = {"studies": n, "rows": len(result.submission()), "seconds": seconds, "files": len(files),
           "reads_per_file": sum(reads.values()) / len(files), "max_reads": max(reads.values()),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_mib": baseline / 1024}
    pixels = {}
    for folder in {f.parent for f in files}:  # headers only, after the peak was read
        header = real_dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
        pixels[folder] = (len(list(folder.glob("*.dcm"))), int(header.Rows), int(header.Columns))
    out["largest_series"] = list(max(pixels.values(), key=lambda shape: shape[0] * shape[1] * shape[2]))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline")
    parser.add_argument("--root", required=True, help="an RSNA-layout folder with a test split")
    parser.add_argument("--studies", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.pipeline, args.root, args.child)))
        return []

    runs = []
    for n in args.studies:
        out = subprocess.run([sys.executable, __file__, args.pipeline, "--root", args.root, "--child", str(n)],
                             check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = runs[0]["peak_rss_mib"]
    print("| studies | files | s / study | peak RSS MiB | vs smallest | dcmread per file (max) | largest series |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for run in runs:
        print(f"| {run['studies']} | {run['files']} | {run['seconds'] / run['studies']:.2f} | "
              f"{run['peak_rss_mib']:.0f} | {run['peak_rss_mib'] / first:.2f}x | {run['reads_per_file']:.2f} "
              f"({run['max_reads']}) | {' x '.join(map(str, run['largest_series']))} |")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return runs


if __name__ == "__main__":
    main()
