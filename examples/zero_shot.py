"""Zero-shot severity scoring from code: severity prompts against crops around labelled findings.

With the tiny preset and no training this is chance; after `recipes/pretrain_clip.py` the same call
gives real scores (on the demo phantom, balanced accuracy about 0.7 against a chance of 1/3):

    python examples/zero_shot.py --data PHANTOM_ROOT --model runs/pretrain/model

The crops are cut as pretraining cuts them: the labelled slice, ``model.config.roi_side_mm``
millimetres wide, centred on the label point.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import spinemm
from spinemm.data import read_series, series_path
from spinemm.text import severity_prompts
from spinemm.zero_shot import crop_finding


def main(argv: list[str] | None = None) -> np.ndarray:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="an RSNA-layout folder with train coordinates")
    parser.add_argument("--model", default="spine-tiny", help="a saved model folder or a preset name")
    parser.add_argument("--condition", default="spinal_canal_stenosis")
    parser.add_argument("--max-crops", type=int, default=16)
    args = parser.parse_args(argv)

    model = spinemm.load_model(args.model)   # a saved folder, a preset (untrained here) or hf-hub:org/name
    frame = spinemm.data.load_tables(args.data, "train")
    rows = frame[(frame.condition == args.condition) & frame.instance_number.notna() & (frame.label >= 0)]
    rows = rows.head(args.max_crops)

    probs = []
    for row in rows.itertuples():
        series = read_series(series_path(args.data, "train", row.study_id, row.series_id))
        image = series.volume[series.instance_to_index[int(row.instance_number)]]
        crop = crop_finding(image, row.x, row.y, side_mm=model.config.roi_side_mm, size=model.image_size,
                            pixel_spacing=series.pixel_spacing)
        prompts = severity_prompts(args.condition, row.level)   # {"Normal/Mild": [...], "Moderate": [...], "Severe": [...]}
        probs.append(spinemm.zero_shot_classify(model, crop[None], prompts)[0])   # [3], sums to 1
    probs = torch.stack(probs).numpy()
    accuracy = np.mean(probs.argmax(1) == rows.label.to_numpy())
    print(f"{len(probs)} crops of {args.condition}: accuracy {accuracy:.3f} (chance 1/3)")
    return probs


if __name__ == "__main__":
    main()
