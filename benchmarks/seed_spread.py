"""How much the demo recipe's quality hangs on the seed: N pipelines scored on one yardstick.

    python benchmarks/seed_spread.py --seeds 0 1 2 3 4 --out runs/spread
    python benchmarks/seed_spread.py --seeds 0 1 2 --out runs/spread-kaggle --variety kaggle
    python benchmarks/seed_spread.py --seeds 0 1 2 --out runs/spread-fixed --fixed-data 0

For each seed the demo trains one pipeline (``python -m spinemm demo --seed S``: phantom, split
and training all drawn from S; with ``--fixed-data D`` the phantom of seed D and training seed S,
which splits data variance from training variance), and ``benchmarks/heldout_quality.py`` scores
it on the same 240 held-out studies (and 60 labelled ones for the located points). Each step runs
in its own process, one after another (two runs at once would share the cores and each time the
other). A seed whose ``heldout.json`` exists is not trained again, so a stopped run resumes and a
finished one takes more seeds. Prints one row per seed, then the mean, standard deviation and
worst seed of the gap each pipeline closes and of its points within 5 mm, and on the labelled set
the gap closed beside the gap the grade stage closes read at the recorded points: the difference is
what the located points cost (``heldout_quality``'s split by stage).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_seed(seed: int, out: Path, sets: Path, variety: str | None, fixed_data: int | None) -> dict:
    """Train (unless done) and score one seed's pipeline; its heldout_quality JSON."""
    folder = out / f"seed{seed}"
    result = folder / "heldout.json"
    if result.is_file():
        return json.loads(result.read_text())
    data_seed = seed if fixed_data is None else fixed_data
    demo = [sys.executable, "-m", "spinemm", "demo", "--seed", str(data_seed), "--train-seed", str(seed),
            "--out", str(folder), *(["--variety", variety] if variety else [])]
    tic = time.perf_counter()
    with (out / f"seed{seed}.log").open("w") as log:
        subprocess.run(demo, stdout=log, stderr=subprocess.STDOUT, check=True)
    train_seconds = time.perf_counter() - tic
    score = [sys.executable, str(HERE / "heldout_quality.py"), "--pipeline", str(folder / "stages" / "pipeline"),
             "--train-root", str(folder / "phantom"), "--sets", str(sets), "--json", str(result),
             *(["--variety", variety, "--n-labelled", "60"] if variety else [])]
    subprocess.run(score, check=True, stdout=subprocess.DEVNULL)
    numbers = json.loads(result.read_text())
    numbers["demo_seconds"] = train_seconds
    result.write_text(json.dumps(numbers, indent=2))
    return numbers


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def spread_table(results: dict[int, dict]) -> str:
    """Markdown: one row per seed, then mean, standard deviation and worst of the gap closed and of
    the points within 5 mm (the first stage's gap beside them)."""
    rows = ["| seed | first stage: gap closed | pipeline score | gap closed | within 5 mm "
            "| labelled set: gap closed | graded at the recorded points |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def at_labels(r: dict) -> tuple[float, float]:  # heldout.json of before the split by stage: NaN
        split = r.get("labelled", {})
        return (split.get("pipeline", {}).get("gap_closed", float("nan")),
                split.get("grade_at_labels", {}).get("gap_closed", float("nan")))

    for seed, r in sorted(results.items()):
        rows.append(f"| {seed} | {r['test_detect']['gap_closed']:.1%} | {r['test_pipeline']['score']:.4f} | "
                    f"{r['test_pipeline']['gap_closed']:.1%} | {r['locations']['within_5mm']:.1%} | "
                    + " | ".join(f"{v:.1%}" for v in at_labels(r)) + " |")
    columns = {"detect": [r["test_detect"]["gap_closed"] for r in results.values()],
               "gap": [r["test_pipeline"]["gap_closed"] for r in results.values()],
               "within": [r["locations"]["within_5mm"] for r in results.values()],
               "labelled": [at_labels(r)[0] for r in results.values()],
               "at_labels": [at_labels(r)[1] for r in results.values()]}

    def over_seeds(summary, values: list[float]) -> float:  # the seeds with the number (NaN: none has it)
        known = [v for v in values if v == v]
        return summary(known) if known else float("nan")

    for name, summary in (("mean", statistics.mean), ("sd", _sd), ("worst", min)):
        c = {k: over_seeds(summary, v) for k, v in columns.items()}
        rows.append(f"| {name} | {c['detect']:.1%} | | {c['gap']:.1%} | {c['within']:.1%} | "
                    f"{c['labelled']:.1%} | {c['at_labels']:.1%} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[int, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--out", required=True, help="one folder per seed, kept for resuming")
    parser.add_argument("--sets", default="heldout_sets", help="the held-out phantoms (written once)")
    parser.add_argument("--variety", choices=["kaggle"], default=None)
    parser.add_argument("--fixed-data", type=int, default=None, help="one phantom seed for every run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {seed: run_seed(seed, out, Path(args.sets), args.variety, args.fixed_data) for seed in args.seeds}
    print(spread_table(results))
    (out / "spread.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    return results


if __name__ == "__main__":
    main()
