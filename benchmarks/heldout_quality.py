"""Quality of a trained pipeline on large held-out phantom sets: the yardstick RESULTS.md judges by.

    python benchmarks/heldout_quality.py --pipeline demo_out/stages/pipeline --train-root demo_out/phantom

Two phantoms the pipeline never saw are written once under ``--sets`` (default ``heldout_sets/``):

- a test set, ``make_phantom(n_studies=2, n_test=240, seed=99, image_size=96)``, scored against its
  ``solution.csv`` beside its oracle floor and a prior-only score (the class frequencies of
  ``--train-root``'s training labels, add-one smoothed, as the phantom computes its own);
- a labelled set, ``make_phantom(n_studies=240, n_test=2, seed=99, image_size=96)``, whose train
  split is scored against train.csv and whose label coordinates give the location errors in mm.

``--variety kaggle`` writes both sets as the real set is shaped (``make_phantom(variety="kaggle",
oblique_axial=0.3)``: each series its own 256-1024 px matrix and vendor, 15-20 sagittal and 30-60
axial slices) under their own names, so they sit beside the plain sets.

Prints a table: the official score of the first stage alone and of the whole pipeline (both from
one run), the share of the gap from prior-only to the oracle floor each closes, and the located
points' median error and share within 5 mm. Pass ``--json FILE`` to keep the numbers.

On the labelled set the gap is split by stage: the grade stage is run a second time with every
labelled finding at its recorded point (``graded_at_labels``), so "grade at recorded points" is
what the grader gives when the locate stage makes no error, and its distance to the pipeline's
number is what the located points cost. The labelled set's oracle is ``P(recorded | true)`` of each
row's true label (``phantom_truth.csv``), as the phantom computes its test set's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

import spinemm
from spinemm.constants import LABEL_COLUMNS, NUM_CLASSES, NUM_TARGETS
from spinemm.data.phantom import noise_transition
from spinemm.data.store import SeriesStore
from spinemm.metrics import rsna_score, submission_frame
from spinemm.pipeline.location_errors import location_errors, summarize_errors
from spinemm.pipeline.stage import StageInput, merge_probs
from spinemm.training.grade import val_solution


def _phantom(root: Path, n_studies: int, n_test: int, seed: int, variety: str | None) -> Path:
    if not (root / "phantom_info.json").is_file():
        shape = {"variety": variety, "oblique_axial": 0.3} if variety else {"image_size": 96}
        spinemm.data.make_phantom(root, n_studies=n_studies, n_test=n_test, seed=seed, workers=None, **shape)
    return root


def prior_submission(train_root: Path, study_ids: list[int]) -> pd.DataFrame:
    """Each column's training class frequencies (add-one smoothed) for every study."""
    frame = spinemm.data.load_tables(train_root, "train")
    labelled = frame[frame.label >= 0]
    counts = np.ones((NUM_TARGETS, NUM_CLASSES))
    np.add.at(counts, (labelled.target.to_numpy(), labelled.label.to_numpy()), 1)
    prior = counts / counts.sum(-1, keepdims=True)
    return submission_frame(study_ids, np.broadcast_to(prior, (len(study_ids), NUM_TARGETS, NUM_CLASSES)))


def graded_at_labels(pipeline, result, frame: pd.DataFrame, store: SeriesStore) -> np.ndarray:
    """``[B, 25, 3]``: the run's probabilities with the grade stage reading every labelled finding
    at its recorded point instead of the located one (the stages before it as they ran)."""
    names = pipeline.stage_names
    previous = names[names.index("grade") - 1]
    findings = result.outputs[previous].findings
    row = {(int(s), int(t)): i for i, (s, t) in enumerate(zip(findings.study_id, findings.target, strict=True))}
    known = frame.dropna(subset=["instance_number", "x", "y"])
    known = known[known.series_id >= 0]
    rows = np.array([row[(int(s), int(t))] for s, t in zip(known.study_id, known.target, strict=True)])
    at_labels = findings.replace(rows, series_id=known.series_id.to_numpy(),
                                 instance_number=known.instance_number.to_numpy().astype(np.int64),
                                 x=known.x.to_numpy(), y=known.y.to_numpy())
    before = result.probs_after(previous).reshape(-1, NUM_CLASSES)
    graded = pipeline.grade.run(StageInput(result.study_ids, store, at_labels, before))
    return merge_probs(before, graded.probs).reshape(len(result.study_ids), NUM_TARGETS, NUM_CLASSES)


def labelled_oracle(root: Path, study_ids: list[int]) -> pd.DataFrame:
    """The labelled set's oracle: ``P(recorded | true)`` of each row's true label."""
    truth = pd.read_csv(root / "phantom_truth.csv")
    truth = truth[truth.split == "train"]
    columns = list(LABEL_COLUMNS)
    true = truth.pivot(index="study_id", columns="column", values="true_label").loc[study_ids, columns]
    noise = json.loads((root / "phantom_info.json").read_text())["label_noise"]
    return submission_frame(study_ids, noise_transition(noise)[true.to_numpy()])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="a pipeline folder (or a model folder: detect only)")
    parser.add_argument("--train-root", required=True, help="the phantom the pipeline trained on (for the prior)")
    parser.add_argument("--sets", default="heldout_sets", help="where the held-out phantoms are (written once)")
    parser.add_argument("--n", type=int, default=240, help="studies per held-out set")
    parser.add_argument("--n-labelled", type=int, default=None, help="studies of the labelled set (default: --n)")
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--variety", choices=["kaggle"], default=None, help="sets shaped like the real set")
    parser.add_argument("--json", default=None)
    parser.add_argument("--test-only", action="store_true",
                        help="score the test set only (no labelled set, no location errors): for grade-stage ablations")
    args = parser.parse_args(argv)

    sets = Path(args.sets)
    tag = f"-{args.variety}" if args.variety else ""
    test_root = _phantom(sets / f"test-{args.n}-seed{args.seed}{tag}", 2, args.n, args.seed, args.variety)
    n_labelled = args.n if args.n_labelled is None else args.n_labelled
    labelled_root = _phantom(sets / f"labelled-{n_labelled}-seed{args.seed}{tag}", n_labelled, 2, args.seed, args.variety)
    pipeline = spinemm.load_pipeline(args.pipeline)
    out: dict = {"pipeline": str(args.pipeline), "stages": pipeline.stage_names}

    tic = time.perf_counter()
    result = spinemm.predict(pipeline, test_root, "test", progress=False)
    out["test_seconds"] = time.perf_counter() - tic
    solution = pd.read_csv(test_root / "solution.csv")
    info = json.loads((test_root / "phantom_info.json").read_text())
    prior = rsna_score(solution, prior_submission(Path(args.train_root), result.study_ids))
    oracle = info["oracle_score"]
    for name, stage in (("detect", "detect"), ("pipeline", "final")):
        score = rsna_score(solution, result.submission(stage))
        out[f"test_{name}"] = {"score": score, "gap_closed": (prior - score) / (prior - oracle)}
    out["test_prior"], out["test_oracle"] = prior, oracle
    print("| set | first stage alone | pipeline | prior-only | oracle floor | gap closed |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {args.n} test studies | {out['test_detect']['score']:.4f} | {out['test_pipeline']['score']:.4f} | "
          f"{prior:.4f} | {oracle:.4f} | {out['test_pipeline']['gap_closed']:.0%} |")
    if args.test_only:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return out

    frame = spinemm.data.load_tables(labelled_root, "train")
    ids = sorted(int(s) for s in frame.study_id.unique())
    store = SeriesStore(labelled_root, "train")
    labelled = spinemm.predict(pipeline, labelled_root, "train", study_ids=ids, store=store, progress=False)
    solution = val_solution(frame, ids)
    prior, oracle = (rsna_score(solution, sub) for sub in (prior_submission(Path(args.train_root), ids),
                                                            labelled_oracle(labelled_root, ids)))
    out["labelled_prior"], out["labelled_oracle"] = prior, oracle
    scores = {"detect": rsna_score(solution, labelled.submission("detect")),
              "pipeline": rsna_score(solution, labelled.submission())}
    if "grade" in pipeline.stage_names and pipeline.stage_names.index("grade") > 0:
        probs = graded_at_labels(pipeline, labelled, frame, store)
        scores["grade_at_labels"] = rsna_score(solution, submission_frame(labelled.study_ids, probs))
    out["labelled_pipeline"] = scores["pipeline"]
    out["labelled"] = {name: {"score": score, "gap_closed": (prior - score) / (prior - oracle)}
                       for name, score in scores.items()}
    out["locations"] = summarize_errors(location_errors(labelled_root, "train", labelled.locations(), frame, store))

    loc = out["locations"]
    print(f"\n| {n_labelled} labelled studies | " + " | ".join(out["labelled"]) + " | prior-only | oracle floor |\n"
          "| --- |" + " ---: |" * (len(out["labelled"]) + 2))
    print("| score (gap closed) | " + " | ".join(f"{v['score']:.4f} ({v['gap_closed']:.0%})"
                                              for v in out["labelled"].values()) + f" | {prior:.4f} | {oracle:.4f} |")
    print(f"\n{n_labelled} labelled studies: pipeline score {out['labelled_pipeline']:.4f}; located points: median "
          f"{loc['median_mm']:.1f} mm, {loc['within_5mm']:.0%} within 5 mm, {loc['within_10mm']:.0%} within 10 mm "
          f"({loc['n_rows']} labelled rows); test predict {out['test_seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
