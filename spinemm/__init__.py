"""spinemm: multimodal CLIP-style models that grade lumbar spine degeneration from MRI.

Heavy submodules (torch, transformers, open_clip) load on first use, so ``import spinemm`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._lazy import lazy_getattr
from .errors import SpineDataError, SpineError, SpineModelError  # noqa: F401 (public re-exports)

__version__ = "0.2.0"

# public name -> module that defines it
_LAZY = {
    "create_model": "spinemm.models.factory",
    "list_models": "spinemm.models.presets",
    "add_model_config": "spinemm.models.presets",
    "load_model": "spinemm.models.factory",
    "create_model_and_transforms": "spinemm.models.preprocess",
    "get_tokenizer": "spinemm.models.preprocess",
    "zero_shot_classify": "spinemm.zero_shot",
    "predict": "spinemm.inference",
    "load_pipeline": "spinemm.pipeline.pipeline",
    "SpinePipeline": "spinemm.pipeline.pipeline",
}
_SUBMODULES = {"data", "models", "training", "metrics", "losses", "text", "constants", "viz", "cli", "inference", "pipeline"}

__all__ = sorted([*_LAZY, *_SUBMODULES, "SpineError", "SpineDataError", "SpineModelError"])
_lazy_names = lazy_getattr(__name__, _LAZY)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"spinemm.{name}")
    return _lazy_names(name)
