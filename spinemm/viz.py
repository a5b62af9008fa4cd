"""Pictures people would rather look at than read: study montages, confusion matrices, curves, overlays.

matplotlib is an optional dependency (``pip install "spinemm[plots]"``); it is imported on first use
and always with the non-interactive Agg backend, so these work on headless machines.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .constants import (
    CONDITION_SHORT,
    LEVEL_NAMES,
    LEVELS,
    METRIC_GROUPS,
    PLANES,
    SEVERITIES,
    TARGET_PLANE_INDEX,
    target_index,
)
from .files import write_atomic
from .marks import Mark, draw_marks, inside_image, legend_handles, side_of

# The paper's colour code: spinal canal red, foraminal pink, subarticular yellow.
_GROUP_COLORS = {"spinal": "#e6194b", "foraminal": "#f58fd0", "subarticular": "#ffe119"}
CONDITION_COLORS = {condition: _GROUP_COLORS[group] for group, members in METRIC_GROUPS.items() for condition in members}


#: Predicted grade colours of the overlays and the grade tables: green, amber, red.
GRADE_COLORS = {"Normal/Mild": "#2ca02c", "Moderate": "#ff9f1c", "Severe": "#d62728"}


def predicted_grades(submission: pd.DataFrame) -> pd.DataFrame:
    """A Kaggle submission frame -> one row per (study_id, condition, level) with the predicted
    ``grade`` (argmax), its probability ``grade_prob`` and the three probabilities."""
    from .constants import CONDITIONS, SUBMISSION_COLUMNS, parse_row_id

    parsed = [parse_row_id(r) for r in submission.row_id]
    probs = submission[list(SUBMISSION_COLUMNS)].to_numpy(dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    condition = [next(c for c in CONDITIONS if col.startswith(c + "_")) for _, col in parsed]
    frame = pd.DataFrame({"study_id": [s for s, _ in parsed], "condition": condition,
                          "level": [col[len(c) + 1:] for (_, col), c in zip(parsed, condition, strict=True)]})
    for k, col in enumerate(SUBMISSION_COLUMNS):
        frame[col] = probs[:, k]
    frame["grade"] = [SEVERITIES[k] for k in probs.argmax(axis=1)]
    frame["grade_prob"] = probs.max(axis=1)
    return frame


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('plots need matplotlib: pip install "spinemm[plots]"') from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _display(image: np.ndarray) -> np.ndarray:
    """Robust window for display only: 1st..99th percentile -> [0, 1]."""
    lo, hi = np.percentile(image, [1, 99])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)


def _save(fig, out: str | Path) -> Path:
    """The figure as a PNG at ``out``, written whole or not at all (:func:`~spinemm.files.write_atomic`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return write_atomic(out, buffer.getvalue())


def finding_label(column_condition: str, level: str) -> str:
    cond = CONDITION_SHORT.get(column_condition, column_condition)
    return f"{cond} {LEVEL_NAMES[LEVELS.index(level)] if level in LEVELS else level}"


def plot_slices_with_points(
    panels: Sequence[Mapping[str, Any]], out: str | Path, title: str | None = None, note: str | None = None,
    columns: int = 4,
) -> Path:
    """One panel per image, ``columns`` to a row: ``{"image": [H, W], "title": str, "points":
    [Mark or (x, y, label, color), ...], "heatmap": optional [H, W] in [0, 1], "legend": optional
    [(text, color), ...] listed under the image}``. Points are in the image's own pixel coordinates;
    how they are drawn (side, recorded or predicted, outside the image) is :func:`spinemm.marks.draw_marks`'s,
    explained by a legend under the figure. ``note``: a line under that legend."""
    plt = _pyplot()
    columns = max(1, min(columns, len(panels)))
    grid_rows = -(-len(panels) // columns)
    lines = max((len(panel.get("legend", ())) for panel in panels), default=0)
    # each panel row: the image, then a strip for its legend lines, so rows never cover each other
    ratios = [r for _ in range(grid_rows) for r in (3.8, 0.05 + 0.14 * lines)]
    fig = plt.figure(figsize=(4.2 * columns, sum(ratios) + 0.6 * grid_rows))
    grid = fig.add_gridspec(2 * grid_rows, columns, height_ratios=ratios, hspace=0.3)
    for i, panel in enumerate(panels):
        ax, strip = fig.add_subplot(grid[2 * (i // columns), i % columns]), fig.add_subplot(grid[2 * (i // columns) + 1,
                                                                                                 i % columns])
        image = np.asarray(panel["image"], dtype=np.float32)
        ax.imshow(_display(image), cmap="gray")
        if panel.get("heatmap") is not None:
            ax.imshow(panel["heatmap"], cmap="inferno", alpha=0.35)
        marks = [p if isinstance(p, Mark) else Mark(*p) for p in panel.get("points", ())]
        draw_marks(ax, marks, image.shape)
        for k, (text, color) in enumerate(panel.get("legend", ())):
            strip.text(0.0, 1.0 - k / max(lines, 1), text, color=color, fontsize=7.5, transform=strip.transAxes,
                       va="top")
        ax.set_title(panel.get("title", ""), fontsize=9)
        ax.axis("off")
        strip.axis("off")
    if any(panel.get("points") for panel in panels):
        fig.legend(handles=legend_handles(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8,
                   frameon=False)
    if note:
        fig.text(0.5, -0.06, note, ha="center", va="top", fontsize=8, wrap=True)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, out)


def study_montage(root: str | Path, study_id: int, out: str | Path, split: str = "train") -> Path:
    """The three planes of one study, each at its labelled slice (or the middle), label points marked."""
    from .data.dicom import read_series
    from .data.tables import load_tables, series_path

    frame = load_tables(root, split)
    rows = frame[frame.study_id == int(study_id)]
    if rows.empty:
        from .errors import SpineDataError

        raise SpineDataError(f"study {study_id} is not in the {split} tables of {root}")
    panels = []
    for plane in PLANES:
        plane_rows = rows[rows.plane == plane]
        series_id = int(plane_rows.series_id.iloc[0])
        if series_id < 0:
            panels.append({"image": np.zeros((8, 8)), "title": f"{plane}: no series"})
            continue
        series = read_series(series_path(root, split, int(study_id), series_id))
        labelled = plane_rows[(plane_rows.series_id == series_id) & plane_rows.instance_number.notna()]
        if len(labelled):
            instance = int(labelled.instance_number.mode().iloc[0])
            index = series.instance_to_index[instance]
        else:
            index, instance = len(series.volume) // 2, int(series.instance_numbers[len(series.volume) // 2])
        points = [
            (r.x, r.y, finding_label(r.condition, r.level), CONDITION_COLORS[r.condition])
            for r in labelled.itertuples()
            if int(r.instance_number) == instance
        ]
        panels.append(
            {"image": series.volume[index], "points": points, "title": f"{plane} · series {series_id} · instance {instance}"}
        )
    return plot_slices_with_points(panels, out, title=f"study {study_id}")


def confusion_matrix_png(matrix: Sequence[Sequence[float]], out: str | Path, title: str = "Confusion matrix") -> Path:
    """Rows = true class, columns = predicted class, in SEVERITIES order; counts and row-normalised shading."""
    plt = _pyplot()
    cm = np.asarray(matrix, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}\n{norm[i, j]:.0%}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.6 else "black", fontsize=9)
    ax.set_xticks(range(len(SEVERITIES)), SEVERITIES)
    ax.set_yticks(range(len(SEVERITIES)), SEVERITIES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, out)


def training_curves_png(history: Sequence[Mapping[str, float]], out: str | Path, keys: Sequence[str] | None = None) -> Path:
    """Plot per-epoch (or per-step) records, e.g. ``[{"epoch": 1, "train_loss": .., "val_score": ..}]``."""
    plt = _pyplot()
    if not history:
        raise ValueError("training_curves_png needs at least one history record")
    x_key = "epoch" if "epoch" in history[0] else "step"
    keys = keys or [k for k in history[0] if k != x_key and isinstance(history[0][k], (int, float))]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = [h[x_key] for h in history]
    for key in keys:
        ax.plot(xs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    ax.set_xlabel(x_key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def stage_curves_png(stages: Sequence[Mapping[str, Any]], out: str | Path) -> Path:
    """Training curves of several stages side by side. Each stage: ``{"title": str, "history":
    [{"epoch": .., "train_loss": .., key: ..}], "keys": {key: label}}``: the training loss on the
    left axis, the validation ``keys`` on the right one (a stage with no record is left out)."""
    plt = _pyplot()
    stages = [st for st in stages if st["history"]]
    if not stages:
        raise ValueError("stage_curves_png needs at least one stage with a history")
    fig, axes = plt.subplots(1, len(stages), figsize=(4.3 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        history = stage["history"]
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h.get("train_loss", np.nan) for h in history], color="#555555", marker=".",
                label="train loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss", fontsize=8)
        right = ax.twinx()
        for (key, label), color in zip(stage["keys"].items(), ("#1f77b4", "#d62728", "#2ca02c"), strict=False):
            rows = [(h["epoch"], h[key]) for h in history if isinstance(h.get(key), (int, float)) and np.isfinite(h[key])]
            if rows:
                right.plot(*zip(*rows, strict=True), color=color, marker="o", label=label)
        lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="best")
        if len(history) == 1:  # a smoke run: say so, or one dot reads as a broken plot
            ax.text(0.5, 0.5, "one epoch: a single point, no curve", transform=ax.transAxes, ha="center",
                    fontsize=8, color="#a00000")
        ax.set_title(stage["title"], fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def bar_chart_png(table: Mapping[str, Mapping[str, float]], metrics: Sequence[str], out: str | Path,
                  title: str = "") -> Path:
    """Grouped bars: ``table[row][metric]``, one panel per metric (e.g. backbones x scores)."""
    plt = _pyplot()
    rows = list(table)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.bar(rows, [table[r].get(metric, np.nan) for r in rows], color="#4c72b0")
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


__all__ = [
    "CONDITION_COLORS",
    "GRADE_COLORS",
    "attention_png",
    "bar_chart_png",
    "confusion_matrix_png",
    "location_overlays",
    "plot_slices_with_points",
    "predicted_grades",
    "stage_curves_png",
    "study_montage",
    "training_curves_png",
]


def location_overlays(root: str | Path, locations: pd.DataFrame, out_dir: str | Path, split: str = "test",
                      max_studies: int = 3, truth: pd.DataFrame | None = None, store: Any = None,
                      submission: pd.DataFrame | None = None) -> list[Path]:
    """One PNG per study: every located finding on its own slice, one panel per (series, slice).

    ``locations`` is the frame of :func:`spinemm.predict`; ``truth`` the long frame of
    :func:`spinemm.data.load_tables`, whose label points are drawn too (white), each on its own
    slice; ``store``: the :class:`~spinemm.data.store.SeriesStore` to read from (default: a new
    one). With ``submission`` (the same run's) each predicted point is coloured by its predicted
    grade (:data:`GRADE_COLORS`) and listed under its panel with the grade's probability; else
    coloured by condition. A point outside its image is flagged at the edge; a finding that was not
    located is named under the figure.
    """
    from .data.store import SeriesStore

    store = store if store is not None else SeriesStore(root, split)
    grades = None
    if submission is not None:
        grades = predicted_grades(submission).set_index(["study_id", "condition", "level"])
    out_dir = Path(out_dir)
    paths = []
    for study_id in list(dict.fromkeys(locations.study_id))[:max_studies]:
        rows = locations[locations.study_id == study_id]
        located = rows[(rows.series_id >= 0) & rows.instance_number.notna()]
        recorded = (truth[(truth.study_id == study_id) & (truth.series_id >= 0) & truth.instance_number.notna()]
                    if truth is not None else located.iloc[:0])
        slices = {(_plane_index(r), int(r.series_id), int(r.instance_number))
                  for frame in (located, recorded) for r in frame.itertuples()}
        panels, outside, undrawn = [], 0, 0
        for plane_index, series_id, instance in sorted(slices):
            series = store.find(int(study_id), series_id, "drawn")
            here = located[(located.series_id == series_id) & (located.instance_number == instance)]
            if series is None or instance not in series.instance_to_index:
                undrawn += len(here)  # named under the figure, never dropped without a word
                continue
            index = series.instance_to_index[instance]
            image = series.volume[index]
            marks = [_overlay_mark(r, grades, series.to_grid_pixels(index, float(r.x), float(r.y)))
                     for r in here.itertuples()]
            outside += sum(not inside_image(m.x, m.y, image.shape) for m in marks)
            legend = [(f"{finding_label(r.condition, r.level)}: {_grade_text(r, grades)}"
                       + ("" if inside_image(m.x, m.y, image.shape) else f", outside the image at ({r.x:.0f}, {r.y:.0f})"),
                       m.color)
                      for r, m in zip(here.itertuples(), marks, strict=True)]
            on_slice = recorded[(recorded.series_id == series_id) & (recorded.instance_number == instance)]
            marks += [Mark(*series.to_grid_pixels(index, float(r.x), float(r.y)), _short_label(r.level, r.condition),
                           "white", recorded=True, side=side_of(r.condition)) for r in on_slice.itertuples()]
            panels.append({"image": image, "points": marks, "legend": legend,
                           "title": f"{PLANES[plane_index]} · series {series_id} · instance {instance}"})
        if panels:
            missing = rows.drop(located.index)
            note = "; ".join(filter(None, [
                f"{outside} of {len(located)} predicted points lie outside their image" if outside else "",
                f"{undrawn} on a slice that could not be read" if undrawn else "",
                "not located: " + ", ".join(finding_label(r.condition, r.level) for r in missing.itertuples())
                if len(missing) else ""])) or None
            title = f"study {int(study_id)}: predicted and recorded points, every finding on its own slice" + (
                "\npredicted points coloured by grade: green Normal/Mild, amber Moderate, red Severe"
                if grades is not None else "")
            paths.append(plot_slices_with_points(panels, out_dir / f"study_{int(study_id)}.png", title=title,
                                                 note=note))
    return paths


def _plane_index(row: Any) -> int:
    return TARGET_PLANE_INDEX[target_index(row.condition, row.level)]


def _short_label(level: str, condition: str) -> str:
    """What is printed beside a point: its level and side (the panel's list says the rest)."""
    side = side_of(condition)
    return LEVEL_NAMES[LEVELS.index(level)] + (f" {side}" if side else "")


def _grade_text(row: Any, grades: pd.DataFrame | None) -> str:
    if grades is None:
        return "located"
    grade = grades.loc[(row.study_id, row.condition, row.level)]
    return f"{grade.grade} {grade.grade_prob:.0%}"


def _overlay_mark(row: Any, grades: pd.DataFrame | None, point: tuple[float, float]) -> Mark:
    """A predicted point's mark at ``point``: the row's, in the pixels of the image drawn."""
    color = (CONDITION_COLORS[row.condition] if grades is None
             else GRADE_COLORS[grades.loc[(row.study_id, row.condition, row.level)].grade])
    return Mark(*point, _short_label(row.level, row.condition), color, side=side_of(row.condition))


def attention_png(items: Sequence[Mapping[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """What a grader looked at: one column per finding, its crop (the finding's slice: the crop's
    middle channel) above the same crop under the query's cross-attention over the crop's tokens,
    upsampled and shaded from the map's lowest to its highest token weight (the colour bar's scale).
    ``items``: ``{"crop": [C, H, W], "attention": [slices, h, w] or [h, w], "title": str,
    "outside": optional str}``; an item with ``outside`` (its point lies outside its image, so its
    crop is empty) is drawn as that flag instead of a black square."""
    import torch
    import torch.nn.functional as F

    plt = _pyplot()
    fig, axes = plt.subplots(2, len(items), figsize=(3.6 * len(items), 7.0), squeeze=False)
    for column, item in enumerate(items):
        top, bottom = axes[0][column], axes[1][column]
        top.set_title(item.get("title", ""), fontsize=8)
        if item.get("outside"):
            for ax, text in ((top, f"POINT OUTSIDE ITS IMAGE\n{item['outside']}"),
                             (bottom, "no attention map:\nthe grader read an empty crop")):
                ax.set_facecolor("#f3d6d6")
                ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color="#a00000", wrap=True,
                        transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
            continue
        crop = torch.as_tensor(item["crop"]).float()
        image = crop[crop.shape[0] // 2].numpy()
        weights = torch.as_tensor(item["attention"]).float()
        weights = weights.sum(0) if weights.ndim == 3 else weights  # a volumetric tower: over its slices
        heat = F.interpolate(weights[None, None], size=image.shape, mode="bilinear", align_corners=False)[0, 0]
        low, high = float(weights.min()), float(weights.max())
        top.imshow(_display(image), cmap="gray")
        bottom.imshow(_display(image), cmap="gray")
        # min..max of this map: a near-uniform map would otherwise look like no attention at all;
        # the colour bar says how narrow that range is
        shade = bottom.imshow(heat.numpy(), cmap="inferno", alpha=0.5, vmin=low, vmax=max(high, low + 1e-12))
        bar = fig.colorbar(shade, ax=bottom, orientation="horizontal", fraction=0.06, pad=0.04,
                           format=_percent_formatter())
        bar.set_label("token weight (share of the query's attention)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
        bottom.set_title(f"token weights {low:.1%} .. {high:.1%}", fontsize=8)
        for ax in (top, bottom):
            ax.scatter([image.shape[1] / 2 - 0.5], [image.shape[0] / 2 - 0.5], marker="+", color="cyan", s=60)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def _percent_formatter() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=2)
