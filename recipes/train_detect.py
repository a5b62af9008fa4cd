"""Train the detect stage: a spinemm model's fusion + heads (optionally LoRA on the towers), with accelerate.

    python recipes/train_detect.py --config recipes/configs/tiny.yaml train.epochs=2
    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml \\
        recipes/train_detect.py --config recipes/configs/tiny.yaml
    python recipes/train_detect.py --config recipes/configs/tiny.yaml --resume latest

Overrides: ``key=value``, ``--key value`` or ``--key=value`` with dotted keys (``optim.lr=1e-4``);
``--help`` lists every key with its default. Outputs under ``output_dir``: ``config.yaml``,
``checkpoint-STEP/``, ``best/``, ``model/``, ``metrics.json``, ``val_submission.csv``.
Start from a pretrained dual encoder with ``init_from=runs/pretrain/model``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from accelerate import PartialState

from spinemm.cli import run_recipe
from spinemm.training import config_from_argv, train_detect


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``--config`` + overrides and train; returns :func:`spinemm.training.train_detect`'s result."""
    result = train_detect(config_from_argv(argv))
    if result["stopped"]:
        PartialState().print(f"stopped at step {result['state'].step} (train.stop_at_step); resume with --resume latest")
    elif result["metrics"]:
        m = result["metrics"]
        PartialState().print(f"val score {m['score']:.4f}  accuracy {m['accuracy']:.3f}  model -> {result['model_dir']}")
    return result


if __name__ == "__main__":
    code = run_recipe(main)  # a bad input is one line on stderr and exit status 2; --debug shows the traceback
    PartialState().destroy_process_group()  # a no-op unless launched with several processes
    sys.exit(code)
