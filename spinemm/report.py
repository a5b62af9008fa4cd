"""A report folder as one page: per-study grade tables and ``index.html`` that shows everything in order.

:func:`grade_table` lays a study's predictions out as a radiologist reads them: one row per level
(L1/L2 .. L5/S1), one column per condition, each cell the predicted grade and its probability (and
the recorded grade when a solution is at hand). :func:`write_index` writes the page.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .constants import (
    CONDITION_NAMES,
    CONDITIONS,
    LEVEL_NAMES,
    LEVELS,
    SEVERITIES,
    SUBMISSION_COLUMNS,
    parse_row_id,
)
from .files import write_atomic
from .viz import GRADE_COLORS, predicted_grades

__all__ = ["better", "flat_metrics", "grade_table", "grade_table_html", "metrics_table_html", "recorded_grades",
           "write_index"]

#: Which way is better, by a metric's last name (suffixes match too: ``locator_val_median_mm``).
#: Log losses and distances: lower; accuracies, F1 and the share of the gap closed: higher.
LOWER_IS_BETTER = ("score", "spinal", "foraminal", "subarticular", "any_severe_spinal", "log_loss", "loss", "_mm")
HIGHER_IS_BETTER = ("accuracy", "precision", "recall", "f1", "gap_closed", "within_5mm", "_per_s")
#: Reference points, not results: what "knows nothing" and "perfect" score.
REFERENCES = {"prior_score": "reference: the class prior alone", "oracle_score": "reference: the best possible",
              "chance": "reference: chance"}
#: Parts of metrics.json that are not metrics: the run's settings and timings, curves (lists).
NOT_METRICS = ("settings", "seconds", "step_seconds", "model_dir")


def recorded_grades(solution: pd.DataFrame) -> dict[tuple[int, str], str]:
    """(study_id, label column) -> recorded grade, from a Kaggle solution frame."""
    onehot = solution[list(SUBMISSION_COLUMNS)].to_numpy()
    return {parse_row_id(r): SEVERITIES[int(k)] for r, k in zip(solution.row_id, onehot.argmax(axis=1), strict=True)}


def grade_table(submission: pd.DataFrame, study_id: int, solution: pd.DataFrame | None = None) -> pd.DataFrame:
    """Levels x conditions of one study: cells ``"Severe 82%"``, plus ``" (recorded Moderate)"``
    where ``solution`` records a different grade (``"✓"`` where it agrees)."""
    grades = predicted_grades(submission)
    grades = grades[grades.study_id == int(study_id)].set_index(["condition", "level"])
    if grades.empty:
        raise ValueError(f"study {study_id} has no rows in the submission")
    recorded = recorded_grades(solution) if solution is not None else {}
    table = pd.DataFrame(index=list(LEVEL_NAMES), columns=list(CONDITION_NAMES), dtype=object)
    for condition, condition_name in zip(CONDITIONS, CONDITION_NAMES, strict=True):
        for level, level_name in zip(LEVELS, LEVEL_NAMES, strict=True):
            row = grades.loc[(condition, level)]
            cell = f"{row.grade} {row.grade_prob:.0%}"
            truth = recorded.get((int(study_id), f"{condition}_{level}"))
            if truth is not None:
                cell += " ✓" if truth == row.grade else f" (recorded {truth})"
            table.loc[level_name, condition_name] = cell
    return table


def grade_table_html(table: pd.DataFrame) -> str:
    """:func:`grade_table` as an HTML table, each cell shaded by its predicted grade."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = []
    for level, cells in table.iterrows():
        tds = []
        for cell in cells:
            grade = next((g for g in sorted(SEVERITIES, key=len, reverse=True) if str(cell).startswith(g)), None)
            style = f' style="background:{GRADE_COLORS[grade]}33"' if grade else ""
            tds.append(f"<td{style}>{html.escape(str(cell))}</td>")
        rows.append(f"<tr><th>{html.escape(str(level))}</th>{''.join(tds)}</tr>")
    return f'<table class="grades"><tr><th>level</th>{head}</tr>{"".join(rows)}</table>'


def write_index(report_dir: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """``report_dir/index.html``: ``sections`` in order, each ``(heading, HTML body)``. Images are
    referenced by their names in ``report_dir`` (the page is moved with its folder)."""
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;border:1px solid #ddd;margin:.3em 0}"
             "table{border-collapse:collapse;margin:.5em 0;font-size:.9em}"
             "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}pre{background:#f6f6f6;padding:1em}"
             ".warning{background:#fff3cd;border:1px solid #e0b400;padding:.6em 1em}.note{color:#a00000}")
    body = "\n".join(f"<h2>{html.escape(heading)}</h2>\n{content}" for heading, content in sections)
    page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
    return write_atomic(Path(report_dir) / "index.html", page.encode("utf-8"))


def better(name: str) -> str:
    """``"lower is better"``, ``"higher is better"``, a reference's meaning, or ``""`` for counts
    and the like, for a dotted metric name."""
    last = name.rsplit(".", 1)[-1]
    if last in REFERENCES:
        return REFERENCES[last]
    if any(last == k or last.endswith(k) for k in LOWER_IS_BETTER):
        return "lower is better"
    if any(last == k or last.endswith(k) for k in HIGHER_IS_BETTER):
        return "higher is better"
    return ""


def flat_metrics(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Every number of a metrics dict as ``(dotted name, value)``, in its order; lists (curves,
    matrices, weights) and :data:`NOT_METRICS` are left out."""
    rows: list[tuple[str, float]] = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if not prefix and key in NOT_METRICS:
            continue
        if isinstance(value, Mapping):
            rows += flat_metrics(value, name + ".")
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            rows.append((name, float(value)))
    return rows


def metrics_table_html(summary: Mapping[str, Any], notes: Mapping[str, str] | None = None) -> str:
    """Every metric of :func:`flat_metrics` as a table row: name, value, which way is better, and
    ``notes[name]`` where given (e.g. "below chance")."""
    notes = notes or {}
    rows = "".join(f"<tr><td><code>{html.escape(name)}</code></td><td>{value:.4g}</td>"
                   f"<td>{html.escape(better(name))}</td><td>{html.escape(notes.get(name, ''))}</td></tr>"
                   for name, value in flat_metrics(summary))
    return ('<table class="metrics"><tr><th>metric</th><th>value</th><th>better</th><th>note</th></tr>'
            f"{rows}</table>")


def image(name: str, alt: str) -> str:
    """An ``<img>`` of a file beside the page."""
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def preformatted(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"
