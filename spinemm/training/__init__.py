"""Training with accelerate: configs, the severity loop (the detect stage), contrastive pretraining,
the later pipeline stages (locate, grade), the backbone comparison, evaluation and atomic
checkpoints. The recipes in ``recipes/`` are thin wrappers::

    from spinemm.training import load_config, train_detect
    result = train_detect(load_config("recipes/configs/tiny.yaml", ["train.epochs=2"]))
    model = spinemm.load_model(result["model_dir"])
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_LAZY = {
    "DEFAULTS": "spinemm.training.config",
    "load_config": "spinemm.training.config",
    "config_from_argv": "spinemm.training.config",
    "save_config": "spinemm.training.config",
    "train_detect": "spinemm.training.detect",
    "train_severity": "spinemm.training.detect",  # the old name of train_detect (deprecated)
    "pretrain_clip": "spinemm.training.pretrain",
    "train_stages": "spinemm.training.stages",
    "train_grade": "spinemm.training.grade",
    "train_grade_stage": "spinemm.training.grade_ensemble",
    "train_locate": "spinemm.training.locate",
    "fit_study_context": "spinemm.training.study_context",
    "compare_backbones": "spinemm.training.compare",
    "evaluate_model": "spinemm.training.evaluate",
    "severity_metrics": "spinemm.training.evaluate",
    "save_checkpoint": "spinemm.training.checkpoint",
    "load_checkpoint": "spinemm.training.checkpoint",
    "latest_checkpoint": "spinemm.training.checkpoint",
    "list_checkpoints": "spinemm.training.checkpoint",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
