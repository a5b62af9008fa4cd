"""Training-step speed and memory of SpineCLIP with LoRA, against its own vision tower in the same run.

One step = forward + backward + AdamW on a batch of whole studies (3 planes x S slices each), bf16
autocast on CUDA. The anchor is the model's vision tower alone, with the same LoRA, on the same
number of images: the ratio says what the text tower, fusion and heads cost on top of it.

The ``vitb16`` size has the architecture of the ``spine-vitb16-bert`` preset (open_clip ViT-B/16 +
BERT-base) built from configs, with random weights (the GPU machine has no hub access, and speed
does not depend on the weights).

    python benchmarks/model_step.py --size vitb16 --batch 8            # GPU (H200: see RESULTS.md)
    python benchmarks/model_step.py --size tiny --steps 2 --warmup 1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch

import spinemm
from spinemm.losses import location_loss, severity_loss
from spinemm.models.lora import add_lora

#: create_model("spine-tiny", **overrides) per size; vitb16 = the spine-vitb16-bert architecture.
SIZES = {
    "tiny": {"num_slices": 4},
    "vitb16": {
        "embed_dim": 512,
        "num_slices": 16,
        "vision": {"image_size": 224, "open_clip_cfg": {"embed_dim": 512, "vision_cfg": {
            "width": 768, "layers": 12, "head_width": 64, "patch_size": 16, "mlp_ratio": 4.0}}},
        "text": {"width": 768, "layers": 12, "heads": 12, "intermediate_size": 3072, "max_length": 64},
        "fusion": {"dim": 256, "layers": 2, "heads": 8, "mlp_ratio": 4.0, "loc_dim": 64},
    },
}


def synthetic_batch(model: torch.nn.Module, studies: int, device: torch.device) -> dict:
    pre = model.preprocess_cfg
    s, size = pre["num_slices"], pre["image_size"]
    return {
        "image": torch.rand(studies, 3, s, 3, size, size, device=device),
        "plane_mask": torch.ones(studies, 3, dtype=torch.bool, device=device),
        "text": None,
        "label": torch.randint(0, 3, (studies, 25), device=device),
        "location": torch.rand(studies, 25, 3, device=device) * torch.tensor([s - 1, 1, 1], device=device),
        "location_mask": torch.ones(studies, 25, dtype=torch.bool, device=device),
    }


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per step after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def make_step(module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(size: str, studies: int, steps: int, warmup: int, lora_r: int, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = add_lora(spinemm.create_model("spine-tiny", **SIZES[size]), r=lora_r, alpha=2 * lora_r).to(device)
    batch = synthetic_batch(model, studies, device)
    images = batch["image"][batch["plane_mask"]].flatten(0, 1)[:, None]  # every slice as its own image

    def full_loss() -> torch.Tensor:
        out = model(batch)
        return severity_loss(out["logits"].float(), batch["label"]) + 0.5 * location_loss(
            out["loc_logits"].float(), batch["location"], batch["location_mask"])

    def tower_loss() -> torch.Tensor:
        tokens, pooled = model.vision(images)
        return tokens.float().square().mean() + pooled.float().square().mean()

    rows = []
    for name, loss_fn in (("vision tower alone (anchor)", tower_loss), ("SpineCLIP step (studies)", full_loss)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds = time_steps(make_step(model, loss_fn, device), steps, warmup, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append({"name": name, "seconds": seconds, "images_per_s": len(images) / seconds, "peak_gib": peak})
    rows[1]["ratio"] = rows[0]["seconds"] / rows[1]["seconds"]
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="vitb16")
    parser.add_argument("--batch", type=int, default=8, help="studies per step (x 3 planes x S slices images)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = run(args.size, args.batch, args.steps, args.warmup, args.lora_r, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.size}, {args.batch} studies/step, LoRA r={args.lora_r}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}"
          f", torch {torch.__version__}, {gpu}\n")
    print("| what | s/step | images/s | peak GiB | step time vs tower alone |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        ratio = f"{1 / r['ratio']:.2f}x" if "ratio" in r else "1.00x"
        print(f"| {r['name']} | {r['seconds']:.4f} | {r['images_per_s']:,.0f} | {r['peak_gib']:.1f} | {ratio} |")
    return rows


if __name__ == "__main__":
    main()
