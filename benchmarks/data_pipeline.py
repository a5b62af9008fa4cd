"""Data-pipeline benchmarks on a 512 px phantom: how fast series get from disk into the model's hands.

Each benchmark is a function ``bench_*(ctx) -> list[Row]`` listed in ``BENCHMARKS``; ``main`` runs
them all and prints one markdown table, so a new measurement is one function plus one list entry.
Timings use a warm page cache (one untimed pass first) and report the best of ``--repeats`` passes;
the rows being compared are timed in alternation so drift on a shared machine hits both alike.

    python benchmarks/data_pipeline.py                   # temporary phantom, deleted afterwards
    python benchmarks/data_pipeline.py --root /tmp/ph512 --series 12   # make once, reuse later

Design anchor (DESIGN §6): pydicom ``dcmread(f).pixel_array`` on 512x512 uint16 runs at about
2,000 files/s on one core; ``read_series`` should cost at most 1.2x that per file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom


@dataclass
class Context:
    """What every benchmark gets: the series folders under test and the timing settings."""

    series_dirs: list[Path]
    repeats: int

    @property
    def files(self) -> list[Path]:
        return [f for d in self.series_dirs for f in sorted(d.glob("*.dcm"))]


@dataclass
class Row:
    """One line of the results table; ``ratio`` is per-file time relative to the plain pydicom loop."""

    name: str
    files: int
    seconds: float  # best pass
    ratio: float | None = None

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds


def best_of(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Warm up each callable once, then time them in alternation; best seconds of each."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def bench_decode(ctx: Context) -> list[Row]:
    """read_series over every series vs ``for f in files: pydicom.dcmread(f).pixel_array``."""
    from spinemm.data.dicom import read_series

    files = ctx.files

    def plain_loop() -> None:
        for f in files:
            pydicom.dcmread(f).pixel_array  # noqa: B018 - decoding is the work being timed

    def spinemm_read() -> None:
        for d in ctx.series_dirs:
            read_series(d)

    base, ours = best_of([plain_loop, spinemm_read], ctx.repeats)
    return [
        Row("pydicom dcmread + pixel_array loop", len(files), base, 1.0),
        Row("spinemm read_series (sorted float32 volume + geometry)", len(files), ours, ours / base),
    ]


def bench_cache(ctx: Context, num_slices: int = 16, image_size: int = 224) -> list[Row]:
    """A SeriesCache hit vs a decode + preprocess of the same series (what the cache saves per epoch)."""
    from spinemm.data.cache import SeriesCache
    from spinemm.data.dicom import read_series
    from spinemm.data.transforms import preprocess_series

    files = ctx.files
    with tempfile.TemporaryDirectory(prefix="spinemm-cache-") as tmp:
        cache = SeriesCache(tmp)

        def decode() -> None:
            for d in ctx.series_dirs:
                preprocess_series(read_series(d), num_slices, image_size, "2.5d")

        def hit() -> None:
            for d in ctx.series_dirs:
                cache.load(d, num_slices, image_size, "2.5d")

        hit()  # fills the cache; every timed pass after this is a pure hit
        cache.reset_stats()
        miss, cached = best_of([decode, hit], ctx.repeats)
        if cache.decodes:
            raise RuntimeError(f"cache benchmark decoded DICOM on a hit pass: {cache.stats()}")
    return [
        Row(f"decode + preprocess (S={num_slices}, {image_size} px, 2.5D)", len(files), miss, None),
        Row(f"SeriesCache hit, same output ({miss / cached:.1f}x faster than decode)", len(files), cached, None),
    ]


BENCHMARKS: list[Callable[[Context], list[Row]]] = [bench_decode, bench_cache]


def series_dirs_under(root: Path) -> list[Path]:
    """Series folders (``{split}_images/{study}/{series}``) holding .dcm files, in a stable order."""
    return sorted(d for d in root.glob("*_images/*/*") if d.is_dir() and any(d.glob("*.dcm")))


def make_data(root: Path, n_series: int, image_size: int, seed: int) -> str:
    """Fill ``root`` with at least ``n_series`` series; returns how the data was made."""
    try:
        from spinemm.data import make_phantom
    except ImportError:  # phantom.py not available yet: measure on plain synthetic series instead
        write_synthetic(root, n_series, image_size, seed)
        return "synthetic uint16 series (make_phantom not importable)"
    # The phantom has up to 3 series per study; ask for enough studies to cover n_series.
    make_phantom(root, n_studies=max(2, -(-n_series // 3)), seed=seed, image_size=image_size, progress=False)
    return "spinemm.data.make_phantom"


def write_synthetic(root: Path, n_series: int, image_size: int, seed: int, n_slices: int = 20) -> None:
    """Uncompressed 512x512 uint16 MR slices in the RSNA layout, shuffled instance numbers."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    for s in range(n_series):
        folder = root / "train_images" / str(1000 + s) / str(5000 + s)
        folder.mkdir(parents=True, exist_ok=True)
        instances = rng.permutation(n_slices) + 1
        for k, instance in enumerate(instances):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
            ds.Modality = "MR"
            ds.Rows = ds.Columns = image_size
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.InstanceNumber = int(instance)
            ds.ImagePositionPatient = [float(k) * 4.0, -100.0, 100.0]
            ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
            ds.PixelSpacing = [0.5, 0.5]
            ds.PixelData = rng.integers(0, 4096, (image_size, image_size), dtype=np.uint16).tobytes()
            ds.save_as(folder / f"{int(instance)}.dcm", enforce_file_format=True)


def markdown(rows: list[Row]) -> str:
    lines = ["| benchmark | files | best s | ms/file | files/s | per-file time vs pydicom loop |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.name} | {r.files} | {r.seconds:.3f} | {1e3 * r.seconds / r.files:.3f} | "
                     f"{r.files_per_s:,.0f} | {ratio} |")
    return "\n".join(lines)


def run(root: Path, args: argparse.Namespace) -> list[Row]:
    origin = "existing data"
    if not series_dirs_under(root):
        origin = make_data(root, args.series, args.image_size, args.seed)
    dirs = series_dirs_under(root)[: args.series]
    ctx = Context(series_dirs=dirs, repeats=args.repeats)
    print(f"data: {root} ({origin}); {len(dirs)} series, {len(ctx.files)} files; "
          f"pydicom {pydicom.__version__}; {os.cpu_count()} CPUs; best of {args.repeats} warm passes\n")
    rows = [row for bench in BENCHMARKS for row in bench(ctx)]
    print(markdown(rows))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="data root to reuse (made there if it holds no series); default: a temporary phantom")
    parser.add_argument("--series", type=int, default=12, help="number of series to read (default 12)")
    parser.add_argument("--image-size", type=int, default=512, help="phantom image size in pixels (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the best counts (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.root is not None:
        args.root.mkdir(parents=True, exist_ok=True)
        run(args.root, args)
    else:
        with tempfile.TemporaryDirectory(prefix="spinemm-bench-") as tmp:
            run(Path(tmp), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
