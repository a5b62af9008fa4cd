"""Contrastive pretraining of the dual encoder on ROI crops paired with severity prompts.

Each labelled (study, condition, level) gives a crop of the original slice around the label point,
``model.config.roi_side_mm`` wide (``pretrain.side_mm`` overrides it), and one severity prompt
(``spinemm.text.severity_prompts``); a class-aware CLIP loss keeps same-severity pairs from being
negatives, and batches are class balanced. The result is a model dir to pass on as ``init_from``
to ``train_detect.py``, or to use for zero-shot scoring of crops cut the same way
(``spinemm.zero_shot.crop_finding``).

    python recipes/pretrain_clip.py --config recipes/configs/tiny.yaml pretrain.epochs=2
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/pretrain_clip.py --config recipes/configs/biomedclip.yaml data.root=/data/rsna

Outputs under ``pretrain.output_dir``: ``config.yaml``, ``checkpoint-STEP/``, ``best/``, ``model/``,
``metrics.json``. Resume with ``--resume latest``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from accelerate import PartialState

from spinemm.cli import run_recipe
from spinemm.training import config_from_argv, pretrain_clip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``--config`` + overrides and pretrain; returns :func:`spinemm.training.pretrain_clip`'s result."""
    result = pretrain_clip(config_from_argv(argv))
    if result["metrics"]:
        m = result["metrics"]
        PartialState().print(f"val contrastive loss {m['score']:.4f}  zero-shot balanced accuracy "
                             f"{m['zero_shot_balanced_accuracy']:.3f} (chance 0.333)  model -> {result['model_dir']}")
    return result


if __name__ == "__main__":
    code = run_recipe(main)  # a bad input is one line on stderr and exit status 2; --debug shows the traceback
    PartialState().destroy_process_group()  # a no-op unless launched with several processes
    sys.exit(code)
