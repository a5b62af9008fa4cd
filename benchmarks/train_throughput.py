"""Training throughput of spinemm's vision tower with LoRA against open_clip's, on one device.

    python benchmarks/train_throughput.py                       # GPU: ViT-B/16, batch 256, bf16
    python benchmarks/train_throughput.py --size tiny --batch 4 --steps 2 --device cpu   # smoke

One step = forward + backward + fused AdamW under bf16 autocast (CUDA; fp32 on CPU), ``--batch``
slices of 3 x 224 px. Rows, all in this run:

- **peer**: open_clip's ViT-B-16 tower + peft LoRA r=16 on ``attn, c_fc, c_proj`` as a user would
  write it (eager: torch.compile cannot trace peft's ``nn.MultiheadAttention`` path);
- **floor**: the same tower frozen, gradients of the activations only, compiled: no LoRA step
  can be cheaper;
- **spinemm**: the same architecture as spinemm builds it (attention on plain Linears), LoRA r=16
  on every Linear of the blocks, the tower compiled with ``fullgraph=True`` (``train.compile``);
- **spinemm, fed from the cache**: the same, with each step's slices read by a DataLoader from a
  series cache written by ``spinemm cache`` (``--data``, ``--cache-dir``), to see whether the data
  keeps up.

Each row: slices/s, the ratio to the peer, model FLOP utilisation (FLOPs counted by torch per step,
over the bf16 matmul rate measured in this run) and peak memory. Targets on an H200 (issue 13):
spinemm >= 4,000 slices/s (2x the peer), >= 45% of the matmul rate, <= 12 GiB at batch 256.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import anchors
import torch

from spinemm.models.attention import convert_multihead_attention


def lora(tower: torch.nn.Module, targets: list[str], r: int) -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    tower = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), tower)
    for name, param in tower.named_parameters():
        param.requires_grad_("lora_" in name)
    return tower


def train_step(tower: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> Callable[[], None]:
    params = [p for p in tower.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda") if params else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            out = tower(batch)
            loss = (out[0] if isinstance(out, tuple) else out).float().square().mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def rows(size: str, batch_size: int, r: int, device: torch.device, steps: int, warmup: int,
         loader_batches: Callable[[], torch.Tensor] | None = None) -> list[dict]:
    torch.manual_seed(0)
    image = anchors.open_clip_tower(size).image_size
    side = image[0] if isinstance(image, (tuple, list)) else image
    batch = torch.rand(batch_size, 3, side, side, device=device)
    peer = lora(anchors.open_clip_tower(size), ["attn", "c_fc", "c_proj"], r).to(device)
    floor = anchors.open_clip_tower(size).to(device).requires_grad_(False)
    floor_input = batch.clone().requires_grad_(True)  # activation gradients only
    ours = anchors.open_clip_tower(size)
    convert_multihead_attention(ours)
    ours = lora(ours, ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"], r).to(device)
    cases = [("peer: open_clip ViT + peft LoRA, eager", train_step(peer, batch, device)),
             ("floor: same tower frozen, compiled", train_step(floor, floor_input, device)),
             ("spinemm: Linear attention + LoRA, compiled", train_step(ours, batch, device))]
    flops = [anchors.flops_per_call(step) for _, step in cases]  # counted eagerly: the counter cannot see compiled code
    floor.compile(fullgraph=True)
    ours.compile(fullgraph=True)
    if loader_batches is not None:
        def fed(step: Callable[[], None] = cases[-1][1]) -> None:
            batch.copy_(loader_batches())
            step()

        cases.append(("spinemm, fed from the cache", fed))
        flops.append(flops[-1])
    out = []
    for (name, step), count in zip(cases, flops, strict=True):
        anchors.reset_peak(device)
        seconds = anchors.seconds_per_step(step, device, steps, warmup)
        out.append({"name": name, "seconds": seconds, "slices_per_s": batch_size / seconds, "peak_gib": anchors.peak_gib(device),
                    "flops": count})
    return out


def cache_batches(root: str, cache_dir: str, batch_size: int, side: int,
                  device: torch.device) -> Callable[[], torch.Tensor]:
    """Endless batches of cached slices (3 neighbours as channels), resized to ``side``."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from spinemm.data.dataset import SpineDataset

    dataset = SpineDataset(root, "train", num_slices=8, image_size=side, cache_dir=cache_dir)
    loader = DataLoader(dataset, batch_size=max(1, batch_size // 24), num_workers=4, persistent_workers=True,
                        collate_fn=lambda samples: torch.cat([s["image"].flatten(0, 1) for s in samples]))
    iterator = iter(loader)

    def next_batch() -> torch.Tensor:
        nonlocal iterator
        slices = []
        while sum(len(s) for s in slices) < batch_size:
            try:
                slices.append(next(iterator))
            except StopIteration:
                iterator = iter(loader)
        images = torch.cat(slices)[:batch_size].to(device, non_blocking=True).float()
        return F.interpolate(images, size=(side, side)) if images.shape[-1] != side else images
    return next_batch


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["vitb16", "tiny"], default="vitb16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--data", help="an RSNA-layout folder (adds the row fed from its cache)")
    parser.add_argument("--cache-dir", help="its series cache, filled by `spinemm cache DATA --cache-dir DIR`")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    ceiling = anchors.matmul_tflops(device)
    side = anchors.open_clip_tower(args.size).image_size
    side = side[0] if isinstance(side, (tuple, list)) else side
    loader = cache_batches(args.data, args.cache_dir, args.batch, side, device) if args.data else None
    results = rows(args.size, args.batch, args.lora_r, device, args.steps, args.warmup, loader)
    anchors.print_table(f"{args.size}, batch {args.batch}, LoRA r={args.lora_r}", results, ceiling, device, "peer")
    return results


if __name__ == "__main__":
    main()
