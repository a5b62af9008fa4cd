"""`spinemm cache` at growing dataset sizes: files/s, bytes on disk per study and peak memory.

    python benchmarks/cache_scale.py ROOT [--sizes 50 100 200] [--workers 2]

``ROOT`` is an RSNA-layout folder with at least ``max(--sizes)`` train studies (e.g.
``spinemm phantom ROOT --n-studies 200 --image-size 256``). For each size N, a folder holding the
first N studies (symlinks, and the three CSVs cut to them) is cached from scratch into an empty
cache folder by a fresh process (``spinemm.data.prepare.fill_cache``); that process reports its
wall time and the peak resident memory of itself and of its largest worker. Flat memory and
linear time mean the command scales to the 1,975-study Kaggle set; the last lines extrapolate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

KAGGLE_STUDIES = 1975
KAGGLE_FILES = 147_000  # train_images of the RSNA 2024 competition: "147k DICOM files, 35 GB" (DESIGN §1)

_CHILD = """
import json, resource, sys
from spinemm.data.prepare import fill_cache
report = fill_cache(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), progress=False)
print(json.dumps({"seconds": report.seconds, "files": report.files, "series": report.written,
                  "failed": len(report.failed),
                  "main_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def subset(root: Path, n: int, out: Path) -> Path:
    """A folder with the first ``n`` train studies of ``root`` (symlinked images, cut CSVs)."""
    labels = pd.read_csv(root / "train.csv")
    studies = set(labels["study_id"].head(n))
    out.mkdir(parents=True)
    labels[labels["study_id"].isin(studies)].to_csv(out / "train.csv", index=False)
    for name in ("train_series_descriptions.csv", "train_label_coordinates.csv"):
        frame = pd.read_csv(root / name)
        frame[frame["study_id"].isin(studies)].to_csv(out / name, index=False)
    (out / "train_images").mkdir()
    for study in sorted(studies):
        (out / "train_images" / str(study)).symlink_to((root / "train_images" / str(study)).resolve())
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = subset(args.root, n, Path(tmp, f"studies-{n}"))
            cache = Path(tmp, f"cache-{n}")
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(cache), str(args.workers)],
                                  capture_output=True, text=True, check=True)
            stats = json.loads(proc.stdout.strip().splitlines()[-1])
            stats["bytes"] = sum(p.stat().st_size for p in cache.rglob("*.safetensors"))
            rows.append((n, stats))
    lines = [f"`spinemm cache` with {args.workers} workers, every series from scratch into an empty cache", "",
             "| studies | series | files | s | files/s | s per study | MiB on disk per study | peak RSS main / worker MiB |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, s in rows:
        lines.append(f"| {n} | {s['series']} | {s['files']} | {s['seconds']:.1f} | {s['files'] / s['seconds']:.0f} | "
                     f"{s['seconds'] / n:.2f} | {s['bytes'] / n / 2**20:.2f} | "
                     f"{s['main_rss_mib']:.0f} / {s['worker_rss_mib']:.0f} |")
    n, s = rows[-1]
    files_per_study, rate = s["files"] / n, s["files"] / s["seconds"]
    lines += ["", f"Extrapolated to the Kaggle train set ({KAGGLE_STUDIES} studies, about {KAGGLE_FILES:,} files) at "
              f"{rate:.0f} files/s: {KAGGLE_FILES / rate / 60:.0f} min on this machine's cores at this image size "
              f"({files_per_study:.0f} files per phantom study). The cache holds float16 at full resolution, "
              f"{s['bytes'] / s['files'] / 1024:.0f} KiB per file here: 2 bytes per pixel, 0.5 MiB per 512 px slice."]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
