"""The files of a saved :class:`~spinemm.models.spine_clip.SpineCLIP` folder, read safely.

``config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) and ``model.safetensors``; a
pickle in their place is refused, and a pipeline folder is pointed at ``spinemm.load_pipeline``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import SpineModelError
from .hub import PICKLE_SUFFIXES, refuse_pickle, resolve_files
from .names import PIPELINE_CONFIG

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "read_saved_config", "load_weights", "check_finite"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: A model saved with LoRA adapters (not merged) holds its adapter beside the base weights, as peft does.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_saved_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a saved model folder, after refusing pickles and pointing pipeline
    folders at ``load_pipeline``."""
    if (folder / PIPELINE_CONFIG).is_file():
        raise SpineModelError(
            f"{folder} is a pipeline folder ({PIPELINE_CONFIG}); load it with spinemm.load_pipeline, or its "
            f"first stage with load_model({str(folder / 'detect')!r})"
        )
    if not (folder / WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            refuse_pickle(folder / pickles[0])
    found = resolve_files(folder, [CONFIG_NAME, WEIGHTS_NAME], setting=str(folder))
    meta = json.loads(found[CONFIG_NAME].read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("model_cfg"), dict):
        raise SpineModelError(f"{found[CONFIG_NAME]} is not a spinemm config (no 'model_cfg' mapping)")
    return meta


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """``path`` (a ``.safetensors`` file, never a pickle) into ``model``, every key matching."""
    from safetensors.torch import load_model as load_safetensors

    refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise SpineModelError(f"{path}: spinemm weights are .safetensors files")
    try:
        load_safetensors(model, str(path), strict=True)
    except RuntimeError as exc:
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        raise SpineModelError(f"{path} does not match model {name!r}: {exc}") from exc
    check_finite(model, path)


def check_finite(model: torch.nn.Module, path: Path) -> None:
    """A :class:`SpineModelError` naming ``path`` and the tensor when a loaded weight holds NaN or
    inf (otherwise every prediction turns NaN far from the cause)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SpineModelError(f"{path}: tensor {name!r} holds NaN or inf values")
