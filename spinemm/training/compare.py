"""The paper's backbone comparison: one run per backbone, same split, same budget.

Each entry of ``compare.backbones`` is ``{name, overrides}``; the overrides (dotted keys, e.g.
``model.kwargs: {vision: {type: cnn}}`` or ``grader.towers: {vision: ...}``) are applied over the
base config, the run goes to ``compare.output_dir/<name>``, and its val metrics land in one table:
``comparison.md`` / ``comparison.csv`` beside the runs (the recipe adds ``comparison.png``:
:func:`comparison_chart`).

``compare.stage`` says which stage the rows train:

- ``detect``: the first stage (``train_detect``); the final model's metrics (the budget is the
  same for all, so the final epoch is the fair point of comparison; the best epoch's is listed too);
- ``grade``: the grade stage of the pipeline ``init_from`` (``train_stages``, ``pipeline.stages:
  [grade]``), so every row grades the same located points; metrics of the selected grader, alone
  (``score``: without the study context), on the val findings; throughput in crops/s.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import SpineModelError
from ..files import write_together
from .config import load_config, save_config

#: Table columns: (key, header, higher is better).
COLUMNS = (
    ("accuracy", "accuracy", True),
    ("macro_precision", "precision (macro)", True),
    ("macro_recall", "recall (macro)", True),
    ("score", "official score", False),
    ("best_score", "best-epoch score", False),
    ("train_studies_per_s", "train studies/s", True),  # compare.stage: detect
    ("eval_studies_per_s", "eval studies/s", True),
    ("train_crops_per_s", "train crops/s", True),  # compare.stage: grade
    ("eval_crops_per_s", "eval crops/s", True),
    ("trainable_params", "trainable params", None),
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def backbone_configs(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, full run config) per selected entry of ``compare.backbones``."""
    entries = config["compare"]["backbones"]
    if not entries:
        raise SpineModelError("compare.backbones is empty: list {name, overrides} entries (see compare-tiny.yaml)")
    only = config["compare"]["only"]
    names = [str(e.get("name", "")) if isinstance(e, dict) else "" for e in entries]
    for entry, name in zip(entries, names, strict=True):
        if not _NAME.match(name):  # it becomes a folder name
            raise SpineModelError(f"compare.backbones entry {entry!r} needs a name of letters, digits, _ . -")
    if only is not None:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SpineModelError(f"compare.only names {unknown} not among compare.backbones {names}")
    out = Path(config["compare"]["output_dir"])
    runs = []
    for entry, name in zip(entries, names, strict=True):
        if only is not None and name not in only:
            continue
        base = copy.deepcopy(config)
        base["compare"]["backbones"] = []  # the per-run config stays small
        run = load_config(base, list((entry.get("overrides") or {}).items()))
        run["output_dir"] = str(out / name)
        runs.append((name, run))
    return runs


def compare_backbones(config: dict[str, Any] | str | Path | None = None, overrides: Any = ()) -> pd.DataFrame:
    """Train every backbone of ``compare.backbones`` and write the comparison table and plot.

    Returns the table (one row per backbone). Every process must call it under ``accelerate launch``.
    """

    from .detect import train_detect

    config = load_config(config, overrides)
    out = Path(config["compare"]["output_dir"])
    if not config["data"]["cache_dir"]:  # decode DICOM once for all runs: throughput = the model's
        config["data"]["cache_dir"] = str(out / "series-cache")
    runs = backbone_configs(config)
    stage = config["compare"]["stage"]
    if stage not in ("detect", "grade"):
        raise SpineModelError(f"compare.stage must be 'detect' or 'grade', got {stage!r}")
    if stage == "grade":
        rows = [_grade_row(name, run) for name, run in runs]
        return _write(pd.DataFrame(rows), config, out)
    warm_cache([run for _, run in runs])
    rows = []
    for name, run in runs:
        result = train_detect(run)
        metrics = result["metrics"] or {}
        rows.append({
            "backbone": name,
            **{k: metrics.get(k) for k in ("accuracy", "macro_precision", "macro_recall", "score")},
            "best_score": (result["best"] or {}).get("score"),
            **result["throughput"],
            "trainable_params": result["parameters"]["trainable"],
            "total_params": result["parameters"]["total"],
            "steps": result["state"].step,
        })
    return _write(pd.DataFrame(rows), config, out)


def _grade_row(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """One grade-stage row: the grade stage trained on ``run``'s pipeline, its val metrics."""
    from .stages import train_stages

    if not run["init_from"]:
        raise SpineModelError("compare.stage: grade needs init_from: a pipeline folder whose located points "
                              "every row grades (e.g. the demo's stages/pipeline)")
    run = {**run, "pipeline": {**run["pipeline"], "stages": ["grade"], "output_dir": run["output_dir"]}}
    result = train_stages(run)["stages"]["grade"]
    metrics, history = result["metrics"] or {}, result["history"]
    finite = [h["score"] for h in history if h.get("score") == h.get("score")]
    return {
        "backbone": name,
        **{k: metrics.get(k) for k in ("accuracy", "macro_precision", "macro_recall")},
        "score": metrics.get("grader_score"),
        "best_score": min(finite) if finite else None,
        "train_crops_per_s": metrics.get("train_crops_per_s"),
        "eval_crops_per_s": metrics.get("eval_crops_per_s"),
        "trainable_params": metrics.get("trainable_params"),
    }


def _write(table: pd.DataFrame, config: dict[str, Any], out: Path) -> pd.DataFrame:
    from accelerate import PartialState

    if PartialState().is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        write_together({out / "comparison.csv": table.to_csv(index=False).encode(),
                        out / "comparison.md": markdown_table(table, config).encode()})
    PartialState().wait_for_everyone()
    return table


def _preprocessing(run: dict[str, Any]) -> tuple[int, int, str]:
    """(num_slices, image_size, channels) a run's model will ask for, without building the model."""
    from ..models.config import merge_overrides
    from ..models.presets import get_model_config
    from .common import model_overrides

    if run["init_from"]:
        pre = json.loads((Path(run["init_from"]) / "config.json").read_text())["preprocess_cfg"]
    else:
        model_cfg = merge_overrides(get_model_config(run["model"]["name"]), model_overrides(run))
        pre = {"num_slices": model_cfg.get("num_slices", 16), "channels": model_cfg.get("channels", "2.5d"),
               "image_size": model_cfg.get("vision", {}).get("image_size", 224)}
    return int(pre["num_slices"]), int(pre["image_size"]), str(pre["channels"])


def warm_cache(runs: list[dict[str, Any]]) -> None:
    """Fill ``data.cache_dir`` with every series at every preprocessing the runs use, before any
    run is timed (the first backbone would otherwise pay for decoding DICOM). Sharded over processes."""
    from accelerate import PartialState

    from ..data.dataset import SpineDataset
    from ..data.tables import load_tables
    from .common import split_studies

    state = PartialState()
    done: set[tuple[Any, ...]] = set()
    for run in runs:
        root = Path(run["data"]["root"])
        key = (str(root), run["data"]["cache_dir"], *_preprocessing(run))
        if key in done or not (root / "train.csv").is_file():
            continue  # a phantom still to be written is warmed by its first run
        done.add(key)
        frame = load_tables(root, "train")
        ids = sorted(sum(split_studies(frame, run), []))
        num_slices, image_size, channels = key[2:]
        dataset = SpineDataset(root, "train", study_ids=ids, num_slices=num_slices, image_size=image_size,
                               channels=channels, cache_dir=run["data"]["cache_dir"], frame=frame)
        for index in range(state.process_index, len(dataset), state.num_processes):
            dataset[index]
    state.wait_for_everyone()


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.2f}M"
    return str(value)


def markdown_table(table: pd.DataFrame, config: dict[str, Any]) -> str:
    """The comparison as a markdown table; the best value of each column is bold."""
    columns = [c for c in COLUMNS if c[0] in table]
    headers = ["backbone", *[h for _, h, _ in columns]]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    best: dict[str, Any] = {}
    for key, _, higher in columns:
        values = pd.to_numeric(table[key], errors="coerce")
        if higher is not None and values.notna().any():
            best[key] = values.max() if higher else values.min()
    for _, row in table.iterrows():
        cells = [str(row["backbone"])]
        for key, _, _ in columns:
            text = _fmt(row.get(key))
            cells.append(f"**{text}**" if key in best and row.get(key) == best[key] else text)
        lines.append("| " + " | ".join(cells) + " |")
    train, data, grader = config["train"], config["data"], config["grader"]
    if config["compare"]["stage"] == "grade":
        lines += ["", f"The grade stage of {config['init_from']}, trained per row on the same study split (seed "
                  f"{config['split']['seed']}), the same located points and the same budget ({grader['epochs']} "
                  f"epochs, batch {grader['batch_size']}); metrics of the selected grader alone (no study "
                  "context) on the val findings. Official score: lower is better; best-epoch score: the best "
                  "single evaluation. Precision / recall: macro over the 3 severities."]
        return "\n".join(lines) + "\n"
    budget = f"max_steps={train['max_steps']}" if train["max_steps"] else f"epochs={train['epochs']}"
    lines += ["", f"Same study split (seed {config['split']['seed']}) and budget ({budget}, batch "
              f"{data['batch_size']}) for every backbone; metrics of the final model on the val studies. "
              "Official score: lower is better. Accuracy / precision / recall: macro over the 3 severities, "
              "all labelled (study, condition, level) rows."]
    return "\n".join(lines) + "\n"


def comparison_chart(table: pd.DataFrame) -> tuple[dict[str, dict[str, float]], list[str]]:
    """What the comparison's bar chart shows: ``(rows, panels)``, ``rows[backbone][panel]`` the
    value, one panel per metric (accuracy, precision, recall, official score, throughput), each
    titled with which way is better. Draw it with :func:`spinemm.viz.bar_chart_png` (the
    ``compare_backbones`` recipe writes ``comparison.png``); training draws no pictures."""
    panels = {key: f"{header} ({'higher' if higher else 'lower'} is better)"
              for key, header, higher in COLUMNS if key in table and key not in ("best_score", "trainable_params")}
    rows = {str(row["backbone"]): {title: float(pd.to_numeric(row[key], errors="coerce"))
                                   for key, title in panels.items()} for _, row in table.iterrows()}
    return rows, list(panels.values())
