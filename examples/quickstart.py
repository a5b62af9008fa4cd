"""Quick start: make a phantom, look at it, build the tiny model, run it on one batch.

    python examples/quickstart.py --out /tmp/spinemm_quickstart
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import spinemm
from spinemm.data import SpineDataset, collate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="quickstart_out")
    parser.add_argument("--n-studies", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    out = Path(args.out)

    # 1. A synthetic dataset in the exact RSNA 2024 layout (real DICOM files).
    root = spinemm.data.make_phantom(out / "phantom", n_studies=args.n_studies, seed=0,
                                     image_size=args.image_size, progress=False)

    # 2. The merged long frame: one row per (study, condition, level).
    frame = spinemm.data.load_tables(root, split="train")
    print(frame.head(3).to_string())

    # 3. One series as a volume in geometric slice order, with its geometry.
    first = frame.iloc[0]
    series = spinemm.data.read_series(spinemm.data.series_path(root, "train", first.study_id, first.series_id))
    print(f"series {first.series_id}: volume {series.volume.shape}, spacing {series.pixel_spacing} mm")

    # 4. The tiny preset, on one collated batch of studies.
    print("presets:", spinemm.list_models())
    model = spinemm.create_model("spine-tiny").eval()
    dataset = SpineDataset(root, split="train", **spinemm.inference.preprocess_settings(model))
    batch = collate([dataset[0], dataset[1]])
    with torch.no_grad():
        outputs = model(batch)
    print("severity logits", tuple(outputs["logits"].shape), "locations", tuple(outputs["location"].shape))
    return {"frame_rows": len(frame), "logits_shape": tuple(outputs["logits"].shape)}


if __name__ == "__main__":
    main()
