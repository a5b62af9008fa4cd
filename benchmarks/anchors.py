"""What the GPU throughput benchmarks measure themselves against, in the same run (DESIGN §6).

- :func:`matmul_tflops`: the bf16 matmul ceiling of this device (model FLOP utilisation divides by it);
- :func:`open_clip_tower`: open_clip's own ViT tower, as open_clip builds it (``nn.MultiheadAttention``):
  ``vitb16`` is ViT-B-16 at 224 px with random weights (speed does not depend on them, and the GPU
  machine has no hub access), ``tiny`` a 2-layer one for CPU smoke runs;
- :func:`seconds_per_step` / :func:`peak_gib` / :func:`flops_per_call` / :func:`print_table`: timing,
  memory, FLOP count and the results table.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

TOWERS = {
    "vitb16": {"width": 768, "layers": 12, "head_width": 64, "patch_size": 16, "mlp_ratio": 4.0, "image_size": 224},
    "tiny": {"width": 64, "layers": 2, "head_width": 32, "patch_size": 8, "mlp_ratio": 2.0, "image_size": 32},
}


def open_clip_tower(size: str) -> nn.Module:
    """open_clip's visual tower for ``size`` (embed dim 512), untouched by spinemm."""
    from open_clip.model import _build_vision_tower  # the builder open_clip.create_model uses

    return _build_vision_tower(512, dict(TOWERS[size]))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(step: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds of ``steps`` calls after ``warmup`` untimed ones (compiles happen there)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        tic = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def matmul_tflops(device: torch.device, n: int | None = None) -> float:
    """bf16 (CUDA) / fp32 (CPU) matmul TFLOP/s of an ``n x n`` product on this device."""
    n = n or (8192 if device.type == "cuda" else 1024)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = seconds_per_step(lambda: a @ b, device, steps=10, warmup=3)
    return 2 * n**3 / seconds / 1e12


def flops_per_call(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward and, if it runs one, backward), by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def print_table(title: str, results: list[dict], ceiling: float, device: torch.device, first: str) -> None:
    """The results as a Markdown table: slices/s, the ratio to the first row (``first`` names it),
    model FLOP utilisation against ``ceiling`` TFLOP/s, peak memory."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{title}, {'bf16' if device.type == 'cuda' else 'fp32'}, torch {torch.__version__}, {name}; "
          f"matmul ceiling {ceiling:.1f} TFLOP/s\n")
    print(f"| what | slices/s | vs {first} | model FLOP utilisation | peak GiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in results:
        mfu = row["flops"] / row["seconds"] / 1e12 / ceiling
        print(f"| {row['name']} | {row['slices_per_s']:,.0f} | {row['slices_per_s'] / results[0]['slices_per_s']:.2f}x | "
              f"{mfu:.0%} | {row['peak_gib']:.1f} |")
