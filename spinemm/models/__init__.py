"""Models: configs and factory, vision/text towers, fusion and heads, baselines, LoRA."""

from __future__ import annotations

from .._lazy import lazy_getattr

_LAZY = {
    "SliceEncoder": "spinemm.models.base",
    "create_model": "spinemm.models.factory",
    "list_models": "spinemm.models.presets",
    "add_model_config": "spinemm.models.presets",
    "load_model": "spinemm.models.factory",
    "create_model_and_transforms": "spinemm.models.preprocess",
    "get_tokenizer": "spinemm.models.preprocess",
    "SpineCLIP": "spinemm.models.spine_clip",
    "add_lora": "spinemm.models.lora",
    "merge_lora": "spinemm.models.lora",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
