"""Zero-shot severity scoring from code: severity prompts against ROI crops around labelled findings.

With the tiny preset and no training this is chance; after `recipes/pretrain_clip.py` (or with the
BiomedCLIP preset and its weights) the same call gives real scores:

    python examples/zero_shot.py --data PHANTOM_ROOT --model runs/pretrain/model
"""

from __future__ import annotations

import argparse

import numpy as np

import spinemm
from spinemm.data import read_series, series_path
from spinemm.text import severity_prompts
from spinemm.zero_shot import crop_roi


def main(argv: list[str] | None = None) -> np.ndarray:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="an RSNA-layout folder with train coordinates")
    parser.add_argument("--model", default="spine-tiny", help="a saved model folder or a preset name")
    parser.add_argument("--condition", default="spinal_canal_stenosis")
    parser.add_argument("--max-crops", type=int, default=16)
    args = parser.parse_args(argv)

    model = spinemm.load_model(args.model) if args.model not in spinemm.list_models() else spinemm.create_model(args.model)
    frame = spinemm.data.load_tables(args.data, "train")
    rows = frame[(frame.condition == args.condition) & frame.instance_number.notna() & (frame.label >= 0)]
    rows = rows.head(args.max_crops)

    crops, labels = [], []
    for row in rows.itertuples():
        series = read_series(series_path(args.data, "train", row.study_id, row.series_id))
        image = series.volume[series.instance_to_index[int(row.instance_number)]]
        crops.append(crop_roi(image, row.x, row.y, size=model.preprocess_cfg["image_size"]))
        labels.append(row.label)

    prompts = severity_prompts(args.condition)          # {"Normal/Mild": [...], "Moderate": [...], "Severe": [...]}
    probs = spinemm.zero_shot_classify(model, crops, prompts).numpy()   # [N, 3], rows sum to 1
    predicted = probs.argmax(1)
    print(f"{len(crops)} crops of {args.condition}: accuracy {np.mean(predicted == np.array(labels)):.3f} (chance 1/3)")
    return probs


if __name__ == "__main__":
    main()
