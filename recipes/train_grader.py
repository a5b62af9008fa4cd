"""Train the ROI grader (second stage) of a trained severity model with accelerate.

    python recipes/train_grader.py --config recipes/configs/tiny.yaml init_from=runs/severity/best
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/train_grader.py --config recipes/configs/vitb16-bert.yaml init_from=runs/severity/best

The fusion model in ``init_from`` stays frozen. First the level locator trains on the labelled
sagittal slices (``locator.*`` keys; ``locator.epochs=0`` skips it), then the grader on crops of
the original slices at the label points (``grader.*`` keys; ``grader.model.*`` sets its
architecture, e.g. ``grader.model.side_mm=50``). Outputs under ``grader.output_dir``:
``config.yaml``, ``model/`` (the two-stage model, for ``spinemm predict``) and ``metrics.json``
with the validation score of the fusion model alone and of both stages, at predicted locations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from accelerate import PartialState

from spinemm.training import config_from_argv, train_grader


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``--config`` + overrides and train; returns :func:`spinemm.training.train_grader`'s result."""
    result = train_grader(config_from_argv(argv))
    m = result.get("metrics") or {}
    if "locator_val_median_mm" in m:
        PartialState().print(f"locator: val median {m['locator_val_median_mm']:.1f} mm, "
                             f"{m['locator_val_within_5mm']:.0%} of levels within 5 mm")
    if "score" in m:  # absent without validation studies
        PartialState().print(f"val score {m['score']:.4f} (grader without study context "
                             f"{m['grader_score']:.4f}, fusion model alone {m['fusion_score']:.4f})  "
                             f"model -> {result['model_dir']}")
    return result


if __name__ == "__main__":
    main()
    PartialState().destroy_process_group()  # a no-op unless launched with several processes
