"""spinemm: multimodal CLIP-style models that grade lumbar spine degeneration from MRI.

Heavy submodules (torch, transformers, open_clip) load on first use, so ``import spinemm`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import SpineDataError, SpineError, SpineModelError  # noqa: F401 (public re-exports)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "create_model": "spinemm.models.factory",
    "list_models": "spinemm.models.factory",
    "add_model_config": "spinemm.models.factory",
    "load_model": "spinemm.models.factory",
    "zero_shot_classify": "spinemm.zero_shot",
    "predict": "spinemm.inference",
}
_SUBMODULES = {"data", "models", "metrics", "losses", "text", "constants", "viz", "cli", "inference"}

__all__ = sorted([*_LAZY, *_SUBMODULES, "SpineError", "SpineDataError", "SpineModelError"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"spinemm.{name}")
    raise AttributeError(f"module 'spinemm' has no attribute {name!r}")
