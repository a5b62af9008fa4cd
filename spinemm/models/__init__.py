"""Models: configs and factory, vision/text towers, fusion and heads, baselines, LoRA."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SliceEncoder": "spinemm.models.base",
    "create_model": "spinemm.models.factory",
    "list_models": "spinemm.models.factory",
    "add_model_config": "spinemm.models.factory",
    "load_model": "spinemm.models.factory",
    "SpineCLIP": "spinemm.models.spine_clip",
    "add_lora": "spinemm.models.lora",
    "merge_lora": "spinemm.models.lora",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spinemm.models' has no attribute {name!r}")
