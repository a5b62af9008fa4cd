"""LoRA on SpineCLIP's towers with peft; fusion and heads always train fully.

``add_lora`` injects peft LoRA layers into the vision and text towers only (``inject_adapter_in_model``,
so the towers keep their classes and the model its attributes) and freezes the towers' base
weights. Target layers are resolved per tower kind when ``targets="auto"``:

=================  ======================================================================
tower kind         LoRA targets (inside each transformer block)
=================  ======================================================================
open_clip ViT      attention ``q_proj, k_proj, v_proj, out_proj`` (spinemm's Linear-projection
                   attention) and MLP ``c_fc, c_proj``
timm ViT           ``attn.qkv, attn.proj, mlp.fc1, mlp.fc2``
BERT               ``query, key, value`` and the ``dense`` layers of each encoder layer
=================  ======================================================================

A tower with none of these (the CNN / ResNet / EfficientNet / 3D U-Net baselines, the learned
"no text" queries) is fully fine-tuned instead: LoRA on a small ConvNet saves little and costs
accuracy, and it keeps the backbone comparison fair (every baseline trains all its weights).

``save_adapter`` writes what differs from the base model (LoRA weights plus every fully trained
part) as safetensors with a JSON config; ``load_adapter`` re-applies it to a freshly built base
model. ``merge_lora`` folds the adapters into the base weights and checks the merged model
against the unmerged one numerically before trusting it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import SpineModelError
from .hub import refuse_pickle
from .saved import ADAPTER_CONFIG, ADAPTER_WEIGHTS

#: SpineCLIP attributes holding the towers; everything else (fusion, heads, projections) trains fully.
TOWERS = ("vision", "text")
MERGE_TOLERANCE = 1e-4

#: Tower kind -> regex (re.fullmatch on module names inside the tower) of the Linear layers to adapt.
TARGET_PATTERNS: dict[str, str] = {
    # open_clip ViT left with nn.MultiheadAttention (vision.convert_attention=false): peft adapts
    # the attention module itself; its merge is the one DESIGN §3 warns about (merge_lora checks it).
    "open_clip_vit_mha": r"(.*\.)?resblocks\.\d+\.(attn|mlp\.(c_fc|c_proj))",
    "open_clip_vit": r"(.*\.)?resblocks\.\d+\.(attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(c_fc|c_proj))",
    "timm_vit": r"(.*\.)?blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
    "bert": r"(.*\.)?encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)",
}

#: A tower's LoRA targets: a regex (re.fullmatch on module names), module-name suffixes, or None
#: (no LoRA: the tower is fully fine-tuned).
TargetSpec = str | list[str] | None


def resolve_targets(tower: nn.Module) -> tuple[str, str] | None:
    """``(kind, regex)`` of the LoRA targets ``"auto"`` picks for ``tower``, or None (full fine-tune)."""
    mha = [n for n, m in tower.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if any(re.fullmatch(TARGET_PATTERNS["open_clip_vit_mha"], n) for n in mha):
        return "open_clip_vit_mha", TARGET_PATTERNS["open_clip_vit_mha"]
    linears = [n for n, m in tower.named_modules() if isinstance(m, nn.Linear)]
    for kind in ("open_clip_vit", "timm_vit", "bert"):
        if any(re.fullmatch(TARGET_PATTERNS[kind], n) for n in linears):
            return kind, TARGET_PATTERNS[kind]
    return None


def _matches(tower: nn.Module, spec: str | list[str]) -> list[str]:
    """Module names in ``tower`` that peft would adapt for ``spec`` (same rules as peft's matching)."""
    names = [n for n, _ in tower.named_modules() if n]
    if isinstance(spec, str):
        return [n for n in names if re.fullmatch(spec, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in spec)]


def _tower_specs(model: nn.Module, targets: str | Sequence[str] | Mapping[str, TargetSpec]) -> dict[str, TargetSpec]:
    """Per-tower target specs from the ``targets`` argument of :func:`add_lora`."""
    towers = {name: getattr(model, name) for name in TOWERS if isinstance(getattr(model, name, None), nn.Module)}
    if not towers:
        raise SpineModelError(f"add_lora expects a model with tower attributes {TOWERS}; got {type(model).__name__}")
    if isinstance(targets, Mapping):
        unknown = sorted(set(targets) - set(towers))
        if unknown:
            raise SpineModelError(f"LoRA targets name unknown towers {unknown}; the model has {sorted(towers)}")
        specs = {name: targets.get(name) for name in towers}
    elif targets == "auto":
        specs = {}
        for name, tower in towers.items():
            found = resolve_targets(tower)
            specs[name] = found[1] if found else None
        return specs
    else:
        specs = {name: targets if isinstance(targets, str) else list(targets) for name in towers}
    for name, spec in specs.items():
        if spec is not None and not _matches(towers[name], spec):
            raise SpineModelError(
                f"LoRA targets {spec!r} match no module of the {name} tower ({type(towers[name]).__name__}); "
                f"pass targets='auto' or a dict with {name!r}: None to fully fine-tune it"
            )
    return specs


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    targets: str | Sequence[str] | Mapping[str, TargetSpec] = "auto",
) -> nn.Module:
    """Inject peft LoRA adapters into the model's towers, in place; returns ``model``.

    ``targets``: ``"auto"`` (per tower kind, see the module docstring), a regex or a list of
    module-name suffixes for both towers, or ``{"vision": spec, "text": spec}`` where a spec of
    None fully fine-tunes that tower. An adapted tower's base weights are frozen; towers without
    LoRA, the fusion decoder, projections and heads all stay trainable.
    """
    if getattr(model, "lora_config", None) is not None:
        raise SpineModelError("the model already has LoRA adapters; merge_lora() it or build a fresh model")
    if r < 1:
        raise SpineModelError(f"LoRA rank r must be >= 1, got {r}")
    specs = _tower_specs(model, targets)
    for name, spec in specs.items():
        tower = getattr(model, name)
        if spec is None:
            tower.requires_grad_(True)
            continue
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=spec, bias="none")
        inject_adapter_in_model(config, tower)  # also freezes every non-LoRA parameter of the tower
    model.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "targets": specs}
    return model


def lora_towers(model: nn.Module) -> list[str]:
    """Names of the towers that carry LoRA adapters."""
    config = getattr(model, "lora_config", None) or {"targets": {}}
    return [name for name, spec in config["targets"].items() if spec is not None]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights only (keys as in ``model.state_dict()``)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything that differs from the base model: LoRA weights, plus the full state of every part
    that trains fully (fusion, heads, projections, towers without LoRA). Frozen base weights of the
    adapted towers are left out."""
    frozen_prefixes = tuple(f"{name}." for name in lora_towers(model))
    return {k: v for k, v in model.state_dict().items()
            if ".lora_" in k or not k.startswith(frozen_prefixes)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights under a LoRA model: the LoRA weights dropped and peft's wrapped
    layers' ``base_layer`` keys under their plain names, so a freshly built model loads them."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (:func:`adapter_state_dict`)."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise SpineModelError("the model has no LoRA adapters to save; call add_lora() first")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (tied weights)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in adapter_state_dict(model).items()}
    save_file(state, str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply an adapter folder written by :func:`save_adapter` to a freshly built base model."""
    folder = Path(directory)
    paths = [folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SpineModelError(f"adapter folder {folder} lacks {missing}")
    try:
        config = json.loads(paths[0].read_text())
        lora_args = {k: config[k] for k in ("r", "alpha", "dropout", "targets")}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SpineModelError(f"{paths[0]} is not a spinemm adapter config: {err}") from err
    add_lora(model, **lora_args)
    refuse_pickle(paths[1])
    try:
        state = load_file(str(paths[1]))
    except Exception as err:  # safetensors' own error types: not a safetensors file
        raise SpineModelError(f"{paths[1]}: not a valid safetensors file ({type(err).__name__}: {err})") from None
    expected = set(adapter_state_dict(model))
    absent, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if absent or extra:
        raise SpineModelError(f"adapter {paths[1]} does not fit this model: missing {absent[:5]}, "
                              f"unexpected {extra[:5]} ({len(absent)} / {len(extra)} keys)")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: a different architecture or rank
        raise SpineModelError(f"adapter {paths[1]} does not fit this model: {err}") from err
    return model


def probe_batch(model: nn.Module, num_slices: int = 2, seed: int = 0) -> dict[str, Any]:
    """A small synthetic collated batch (one study, every plane present) for numerical checks."""
    from ..constants import PLANES
    from ..text import QUERY_TEXTS

    size = getattr(model, "image_size", None)
    if not isinstance(size, int):
        raise SpineModelError(f"cannot build a probe batch for {type(model).__name__}: pass probe=<batch>")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(1, len(PLANES), num_slices, 3, size, size, generator=gen)
    return {"image": image.to(device), "plane_mask": torch.ones(1, len(PLANES), dtype=torch.bool, device=device),
            "text": [list(QUERY_TEXTS)]}


def _float_outputs(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        out = {"output": out}
    return {k: v.detach().float() for k, v in out.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def merge_lora(model: nn.Module, probe: Mapping[str, Any] | None = None,
               atol: float = MERGE_TOLERANCE) -> nn.Module:
    """Fold the LoRA adapters into the tower weights, in place; returns the plain model.

    The merged model is checked against the unmerged one on ``probe`` (a collated batch; default
    :func:`probe_batch`), in eval mode. If any output differs by more than ``atol`` the merge is
    undone and :class:`SpineModelError` raised, so a broken merge (peft's MultiheadAttention
    ``out_proj`` path) is never trusted silently.
    """
    if getattr(model, "lora_config", None) is None:
        raise SpineModelError("the model has no LoRA adapters to merge")
    layers = [(tower, name, module) for tower in lora_towers(model)
              for name, module in getattr(model, tower).named_modules() if isinstance(module, LoraLayer)]
    was_training = model.training
    model.eval()
    batch = probe if probe is not None else probe_batch(model)
    # unmerge() subtracts the delta again, which is not bit-exact: keep the weights to restore
    snapshot = {t: {k: v.clone() for k, v in getattr(model, t).state_dict().items()} for t in lora_towers(model)}
    with torch.no_grad():
        before = _float_outputs(model(batch))
        for _, _, module in layers:
            if not module.merged:  # an inner layer of a wrapped MultiheadAttention merges with it
                module.merge(safe_merge=True)
        after = _float_outputs(model(batch))
    model.train(was_training)
    worst = max(((after[k] - v).abs().max().item(), k) for k, v in before.items())
    if worst[0] > atol:
        for _, _, module in reversed(layers):
            if module.merged:
                module.unmerge()
        for tower, state in snapshot.items():
            getattr(model, tower).load_state_dict(state)
        raise SpineModelError(f"merged LoRA model differs from the unmerged one by {worst[0]:.3g} on output "
                              f"{worst[1]!r} (tolerance {atol:g}); the merge was undone")
    # Swap each LoRA layer for its (now merged) base layer; innermost first for nested wrappers.
    for tower, name, module in sorted(layers, key=lambda t: -t[1].count(".")):
        parent_name, _, attr = name.rpartition(".")
        root = getattr(model, tower)
        setattr(root.get_submodule(parent_name) if parent_name else root, attr, module.get_base_layer())
    for tower in lora_towers(model):
        tower_module = getattr(model, tower)
        tower_module.requires_grad_(True)  # a plain model again, as create_model builds it
        if "peft_config" in vars(tower_module):
            del tower_module.peft_config
    model.lora_config = None
    return model


def trainable_parameter_summary(model: nn.Module) -> str:
    """A table of parameter counts per top-level part: total, trainable, LoRA, and how it trains."""
    lora = set(lora_towers(model))
    rows = [("part", "total", "trainable", "lora", "mode")]
    sums = [0, 0, 0]
    for name, part in model.named_children():
        params = list(part.named_parameters())
        counts = [sum(p.numel() for _, p in params),
                  sum(p.numel() for _, p in params if p.requires_grad),
                  sum(p.numel() for n, p in params if ".lora_" in f".{n}")]
        if not counts[0]:
            continue
        mode = "lora" if name in lora else ("full" if counts[1] == counts[0] else
                                            "frozen" if not counts[1] else "partial")
        rows.append((name, *(f"{c:,}" for c in counts), mode))
        sums = [a + b for a, b in zip(sums, counts, strict=True)]
    own = [p for n, p in model.named_parameters(recurse=False)]  # e.g. logit_scale
    if own:
        counts = [sum(p.numel() for p in own), sum(p.numel() for p in own if p.requires_grad), 0]
        rows.append(("(own)", *(f"{c:,}" for c in counts), "full" if counts[1] == counts[0] else "frozen"))
        sums = [a + b for a, b in zip(sums, counts, strict=True)]
    share = 100.0 * sums[1] / max(sums[0], 1)
    rows.append(("total", *(f"{c:,}" for c in sums), f"{share:.2f}% trainable"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    return "\n".join(line.rstrip() for line in lines)
