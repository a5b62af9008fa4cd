"""Train the pipeline's later stages (locate, grade) on top of a trained detect model, with accelerate.

    python recipes/train_stages.py --config recipes/configs/tiny.yaml init_from=runs/severity/best
    python recipes/train_stages.py --config recipes/configs/tiny.yaml init_from=runs/pipeline/pipeline \\
        pipeline.stages=grade
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/train_stages.py --config recipes/configs/vitb16-bert.yaml init_from=runs/severity/best

The detect model in ``init_from`` stays frozen. ``pipeline.stages`` picks the stages to train
(``locate,grade`` by default; a pipeline folder in ``init_from`` keeps the stages not retrained).
The level locator trains on the labelled sagittal slices (``locator.*`` keys), the grader on crops
of the original slices at the label points (``grader.*``; ``grader.model.*`` sets its architecture,
e.g. ``grader.model.side_mm=50``), each through the engine (checkpoints, ``resume=latest``,
accumulation, TensorBoard). Outputs under ``pipeline.output_dir``: ``config.yaml``, ``locate/``,
``grade/``, ``pipeline/`` (for ``spinemm predict``) and ``metrics.json``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

from accelerate import PartialState

from spinemm.cli import run_recipe
from spinemm.training import config_from_argv, train_stages


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``--config`` + overrides and train; returns :func:`spinemm.training.train_stages`'s result."""
    result = train_stages(config_from_argv(argv))
    say = PartialState().print
    locate = result["stages"].get("locate", {}).get("metrics", {})
    if math.isfinite(locate.get("val_median_mm", math.nan)):  # trained, and there were val slices
        say(f"locate: val median {locate['val_median_mm']:.1f} mm, {locate['val_within_5mm']:.0%} of levels within 5 mm")
    grade = result["stages"].get("grade", {}).get("metrics", {})
    if "score" in grade:  # absent without validation studies
        say(f"grade: val score {grade['score']:.4f} (without study context {grade['grader_score']:.4f}, "
            f"before grading {grade['before_score']:.4f})")
    if result["pipeline_dir"] is not None:
        say(f"pipeline -> {result['pipeline_dir']}")
    return result


if __name__ == "__main__":
    code = run_recipe(main)  # a bad input is one line on stderr and exit status 2; --debug shows the traceback
    PartialState().destroy_process_group()  # a no-op unless launched with several processes
    sys.exit(code)
