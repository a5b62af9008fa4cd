"""Inference throughput of spinemm's models against open_clip's tower, on one device, same run.

    python benchmarks/inference_throughput.py                    # GPU: ViT-B/16 at 224 px, bf16 weights
    python benchmarks/inference_throughput.py --size tiny --batch 4 --steps 2 --device cpu   # smoke

Rows (slices/s, model FLOP utilisation against the matmul rate measured in this run, peak memory):

- **anchor**: open_clip's ViT-B-16 tower, bf16 weights, eager (DESIGN §6: 10,497 img/s on an H200);
- **spinemm tower**: the same architecture as spinemm builds it, bf16 weights, compiled;
- **spinemm detect model**: the ``spine-vitb16-bert`` architecture (ViT-B/16 + BERT-base + fusion,
  random weights, as ``benchmarks/model_step.py``) on whole studies (3 planes x S slices), its
  fusion core compiled (``SpinePipeline.compile``), the text tower's queries computed once.

Target on an H200 (issue 13): >= 11,000 slices/s. End to end from DICOM files (decode in worker
processes, models on the GPU) is ``benchmarks/predict_throughput.py --device cuda``.
"""

from __future__ import annotations

import argparse

import anchors
import torch
from model_step import SIZES, synthetic_batch

import spinemm
from spinemm.models.attention import convert_multihead_attention


def rows(size: str, batch_size: int, device: torch.device, steps: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    anchor = anchors.open_clip_tower(size).to(device, dtype).eval()
    side = anchor.image_size[0] if isinstance(anchor.image_size, (tuple, list)) else anchor.image_size
    images = torch.rand(batch_size, 3, side, side, device=device, dtype=dtype)
    ours = anchors.open_clip_tower(size)
    convert_multihead_attention(ours)
    ours = ours.to(device, dtype).eval()

    model = spinemm.create_model("spine-tiny", **SIZES[size]).to(device, dtype).eval()
    slices_per_study = 3 * model.preprocess_cfg["num_slices"]
    studies = max(1, batch_size // slices_per_study)
    batch = synthetic_batch(model, studies, device)
    image, plane_mask, queries = model.fuse_inputs({**batch, "image": batch["image"].to(dtype)})

    cases = [("anchor: open_clip ViT tower, eager", lambda: anchor(images), batch_size),
             ("spinemm tower, compiled", lambda: ours(images), batch_size),
             (f"spinemm detect model ({studies} studies), compiled", lambda: fused(image, plane_mask, queries),
              studies * slices_per_study)]
    fused = model.fuse
    with torch.no_grad():
        flops = [anchors.flops_per_call(fn) for _, fn, _ in cases]
        ours.compile(fullgraph=True)
        fused = torch.compile(model.fuse, fullgraph=True)
        out = []
        for (name, fn, slices), count in zip(cases, flops, strict=True):
            anchors.reset_peak(device)
            seconds = anchors.seconds_per_step(fn, device, steps, warmup)
            out.append({"name": name, "seconds": seconds, "slices_per_s": slices / seconds, "flops": count,
                        "peak_gib": anchors.peak_gib(device)})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["vitb16", "tiny"], default="vitb16")
    parser.add_argument("--batch", type=int, default=256, help="slices per call")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    ceiling = anchors.matmul_tflops(device)
    results = rows(args.size, args.batch, device, args.steps, args.warmup)
    anchors.print_table(f"{args.size}, {args.batch} slices per call", results, ceiling, device, "anchor")
    return results


if __name__ == "__main__":
    main()
