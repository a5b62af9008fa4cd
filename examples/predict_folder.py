"""Predict a Kaggle-layout folder: submission.csv (severity) and locations.csv (where each finding is).

    python examples/predict_folder.py --model runs/tiny/pipeline/pipeline --data /path/to/rsna --out preds/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import spinemm


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True,
                        help="a pipeline folder (recipes/train_stages.py), a model folder, a preset or hf-hub:org/name")
    parser.add_argument("--data", required=True, help="a folder with test_series_descriptions.csv + test_images/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)

    model = spinemm.load_pipeline(args.model)   # any model name: a folder, a preset, hf-hub:org/name
    result = spinemm.predict(model, args.data, split=args.split)  # every stage's output
    submission, locations = result
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    submission.to_csv(out / "submission.csv", index=False)
    locations.to_csv(out / "locations.csv", index=False)
    print(submission.head().to_string())
    print(locations.head().to_string())

    solution = Path(args.data) / "solution.csv"    # the phantom ships one; Kaggle's is hidden
    if solution.exists():
        import pandas as pd

        print(f"official score {spinemm.metrics.rsna_score(pd.read_csv(solution), submission):.4f}")
    return submission, locations


if __name__ == "__main__":
    main()
