"""The paper's experiment: CNN, ResNet50, EfficientNet, 3D U-Net, CLIP (open_clip ViT) and the
no-text ablation of BERT, trained on the same study split with the same budget.

    python recipes/compare_backbones.py --config recipes/configs/compare-tiny.yaml
    python recipes/compare_backbones.py --config recipes/configs/compare-tiny.yaml compare.only=[cnn,clip]

Writes ``comparison.md`` (markdown table), ``comparison.png`` (accuracy, precision, recall,
official score, throughput per backbone) and ``comparison.csv`` to ``compare.output_dir``, with one
run folder per backbone beside them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from accelerate import PartialState

from spinemm.cli import run_recipe
from spinemm.training import compare_backbones, config_from_argv
from spinemm.training.compare import comparison_chart
from spinemm.viz import bar_chart_png


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Parse ``--config`` + overrides and run the comparison; returns the table."""
    config = config_from_argv(argv)
    table = compare_backbones(config)
    if PartialState().is_main_process:
        rows, panels = comparison_chart(table)
        chart = Path(config["compare"]["output_dir"]) / "comparison.png"
        bar_chart_png(rows, panels, chart, title="spinemm backbone comparison (same split, same budget)")
    PartialState().print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    code = run_recipe(main)  # a bad input is one line on stderr and exit status 2; --debug shows the traceback
    PartialState().destroy_process_group()  # a no-op unless launched with several processes
    sys.exit(code)
