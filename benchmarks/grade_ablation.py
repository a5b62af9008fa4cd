"""What each grade-stage option buys, with everything before the grade stage held fixed.

    python benchmarks/grade_ablation.py --demos runs/spread/seed0 runs/spread/seed1 --out runs/ablation

For each finished demo folder (``spinemm demo --out DIR``: its phantom, its trained pipeline and
the resolved ``stages/config.yaml``), the grade stage alone is trained again on top of the demo's
own detect and locate stages (``train_stages`` with ``pipeline.stages=[grade]``), once per variant:

- ``single``: the demo recipe's grade stage, as the demo trains it (the baseline);
- ``folds5``: a 5-fold ensemble (``grader.folds=5``), whose out-of-fold grades give ``oof.csv``;
- ``sides``: left/right folding (``grader.model.fold_sides=true``);
- ``labelcheck``: the single grader trained without the labels the 5-fold ensemble's out-of-fold
  grades contradict (``grader.drop_below``, reading ``folds5``'s ``oof.csv``);
- ``folds5+sides``: both, the 5-fold ensemble of side-folding graders;
- ``average``: the weights averaged over the selection window (``grader.average_window``).

(The demo recipe folds sides since 2026-12-06, so on demos trained since, ``sides`` is ``single``.)

Every pipeline is scored on the same 240 held-out studies (``heldout_quality.py --test-only``).
The label check's flagged labels are compared with the phantom's truth (``phantom_truth.csv``:
a recorded label that differs from the true one is noise): precision and recall. Each step runs in
its own process, one after another; a step whose output exists is not run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "train_stages.py"
DROP_BELOW = 0.1  # a recorded grade the folds give under 10%: the label check leaves it out

VARIANTS = {
    "single": [],
    "folds5": ["grader.folds=5"],
    "sides": ["grader.model.fold_sides=true"],
    "labelcheck": [f"grader.drop_below={DROP_BELOW}", "grader.oof_from={out}/folds5/grade/oof.csv"],
    "folds5+sides": ["grader.folds=5", "grader.model.fold_sides=true"],
    "average": ["grader.average_window=true"],
}


def run_variant(demo: Path, out: Path, name: str, sets: Path, n: int = 240) -> dict:
    """Train (unless done) and score one variant's pipeline; its heldout_quality JSON."""
    folder = out / name
    result = folder / "heldout.json"
    if result.is_file():
        return json.loads(result.read_text())
    overrides = [o.format(out=out) for o in VARIANTS[name]]
    train = [sys.executable, str(RECIPE), "--config", str(demo / "stages" / "config.yaml"),
             f"init_from={demo / 'stages' / 'pipeline'}", "pipeline.stages=[grade]", f"pipeline.output_dir={folder}",
             "log.progress=false", "checkpoint.overwrite=true", *overrides]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "train.log").open("w") as log:
        subprocess.run(train, stdout=log, stderr=subprocess.STDOUT, check=True)
    score = [sys.executable, str(HERE / "heldout_quality.py"), "--pipeline", str(folder / "pipeline"),
             "--train-root", str(demo / "phantom"), "--sets", str(sets), "--n", str(n), "--test-only",
             "--json", str(result)]
    subprocess.run(score, check=True, stdout=subprocess.DEVNULL)
    numbers = json.loads(result.read_text())
    metrics = json.loads((folder / "metrics.json").read_text())["stages"]["grade"]["metrics"]
    numbers["grade_metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    result.write_text(json.dumps(numbers, indent=2))
    return numbers


def label_check_quality(demo: Path, out: Path) -> dict:
    """Precision and recall of the labels the check flags, against the phantom's truth."""
    from spinemm.training.label_check import contradicted_labels

    oof = pd.read_csv(out / "folds5" / "grade" / "oof.csv")
    truth = pd.read_csv(demo / "phantom" / "phantom_truth.csv")
    truth = truth[truth.split == "train"]
    noisy = set(zip(truth.study_id, truth.column, strict=True)) - {
        (s, c) for s, c, t, r in zip(truth.study_id, truth.column, truth.true_label, truth.recorded_label,
                                     strict=True) if t == r}
    flagged = contradicted_labels(oof, DROP_BELOW)
    flagged_keys = {(int(s), str(r).split("_", 1)[1]) for s, r in zip(flagged.study_id, flagged.row_id, strict=True)}
    covered = {(int(s), str(r).split("_", 1)[1]) for s, r, lab in zip(oof.study_id, oof.row_id, oof.label, strict=True)
               if lab >= 0}
    hits = len(flagged_keys & noisy)
    return {"flagged": len(flagged_keys), "noisy_labels": len(noisy & covered), "labels": len(covered),
            "precision": hits / len(flagged_keys) if flagged_keys else float("nan"),
            "recall": hits / len(noisy & covered) if noisy & covered else float("nan")}


def table(results: dict[str, dict]) -> str:
    names = list(VARIANTS)
    rows = ["| demo | " + " | ".join(f"{n}: gap closed" for n in names) + " | label check: flagged, precision, recall |",
            "| --- |" + " ---: |" * (len(names) + 1)]
    for demo, r in results.items():
        check = r.get("label_check", {})
        cells = [f"{r[n]['test_pipeline']['gap_closed']:.1%}" if n in r else "" for n in names]
        rows.append(f"| {Path(demo).name} | " + " | ".join(cells) +
                    (f" | {check['flagged']}, {check['precision']:.0%}, {check['recall']:.0%} |" if check else " | |"))
    for n in names[1:]:
        diffs = [(r[n]["test_pipeline"]["gap_closed"] - r["single"]["test_pipeline"]["gap_closed"]) * 100
                 for r in results.values() if n in r and "single" in r]
        if diffs:
            rows.append(f"\n{n} - single: mean {statistics.mean(diffs):+.1f} points of the gap "
                        f"(per demo: {', '.join(f'{d:+.1f}' for d in diffs)})")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demos", nargs="+", required=True, help="finished `spinemm demo --out` folders")
    parser.add_argument("--out", required=True, help="one folder per demo and variant, kept for resuming")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS)[:4], choices=list(VARIANTS))
    parser.add_argument("--sets", default="heldout_sets")
    parser.add_argument("--n", type=int, default=240, help="held-out test studies")
    args = parser.parse_args(argv)
    results: dict[str, dict] = {}
    for demo in map(Path, args.demos):
        out = Path(args.out) / demo.name
        results[str(demo)] = {}
        for name in args.variants:
            results[str(demo)][name] = run_variant(demo, out, name, Path(args.sets), args.n)
        if (out / "folds5" / "grade" / "oof.csv").is_file() and (demo / "phantom" / "phantom_truth.csv").is_file():
            results[str(demo)]["label_check"] = label_check_quality(demo, out)
        (Path(args.out) / "ablation.json").write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
