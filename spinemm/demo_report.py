"""The demo's pictures and its one-page report (``report/index.html``), in the order a
clinician-researcher reads them: scores, every stage's training curves, the confusion matrix, where
each finding was placed and graded, what the grader looked at, and each study's grades per level.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .constants import CONDITIONS, LEVELS, SEVERITIES
from .report import grade_table, grade_table_html, image, preformatted, recorded_grades, write_index
from .viz import attention_png, finding_label, location_overlays, predicted_grades, stage_curves_png

#: Per stage: the panel title and the validation keys of its history drawn on the right axis.
STAGE_CURVES = {
    "pretrain": ("pretraining: dual encoder", {"zero_shot_balanced_accuracy": "val zero-shot balanced accuracy"}),
    "detect": ("detect stage", {"score": "val official score"}),
    "locate": ("locate stage: level locator", {"val_median_mm": "val median error (mm)"}),
    "grade": ("grade stage: text-queried grader", {"score": "val official score",
                                                   "grader_score": "val score, no study context"}),
}
#: How many findings get an attention picture, and how many studies a grade table.
N_EXPLAINED, N_TABLES = 4, 3


def report_pictures(report: Path, root: Path, result: Any, pipeline: Any, store: Any, solution: pd.DataFrame,
                    truth: pd.DataFrame, histories: Mapping[str, list]) -> dict[str, Any]:
    """Write the report's pictures; returns their paths and the grade tables."""
    stages = [{"title": STAGE_CURVES[name][0], "history": history, "keys": STAGE_CURVES[name][1]}
              for name, history in histories.items()]
    submission = result.submission()
    shown = most_abnormal_studies(submission, N_TABLES)  # the overlay and the tables show the same studies
    locations = result.locations()
    pictures: dict[str, Any] = {
        "stage_curves": stage_curves_png(stages, report / "stage_curves.png"),
        "overlays": location_overlays(root, locations[locations.study_id == shown[0]], report, split="test",
                                      max_studies=1, truth=truth, store=store, submission=submission),
        "attention": None, "attention_note": "",
        "tables": [(sid, grade_table(submission, sid, solution)) for sid in shown],
    }
    if pipeline.grade is None or type(pipeline.grade.grader).__name__ != "CropGrader":
        pictures["attention_note"] = "This pipeline's grader has no query cross-attention to show (not the clip grader)."
        return pictures
    rows = explained_rows(result.grade_log_probs, result.graded, N_EXPLAINED)
    seen = pipeline.grade.attention(result.graded, store, rows)
    recorded = recorded_grades(solution)
    items = []
    for i, row in enumerate(rows):
        study, target = int(result.graded.study_id[row]), int(result.graded.target[row])
        condition, level = CONDITIONS[target // len(LEVELS)], LEVELS[target % len(LEVELS)]
        probs = np.exp(result.grade_log_probs[row])  # the stage's grade (its passes' mean), not the last read
        grade = SEVERITIES[int(probs.argmax())]
        truth_grade = recorded.get((study, f"{condition}_{level}"), "not recorded")
        items.append({"crop": seen["crops"][i], "attention": seen["attention"][i],
                      "title": f"study {study}\n{finding_label(condition, level)}: {grade} {probs.max():.0%}\n"
                               f"recorded {truth_grade}"})
    pictures["attention"] = attention_png(items, report / "grader_attention.png",
                                          title="the grader's query: cross-attention over its crop (last layer)")
    return pictures


def most_abnormal_studies(submission: pd.DataFrame, count: int) -> list[int]:
    """The studies with the most findings predicted Moderate or Severe (ties: submission order)."""
    grades = predicted_grades(submission)
    abnormal = (grades.grade != SEVERITIES[0]).groupby(grades.study_id, sort=False).sum()
    return [int(s) for s in abnormal.sort_values(ascending=False, kind="stable").index[:count]]


def explained_rows(log_probs: np.ndarray, graded: Any, count: int) -> np.ndarray:
    """The graded findings most likely abnormal (Moderate or Severe), one per (study, condition)."""
    rows = np.flatnonzero(~np.isnan(log_probs[:, 0]) & graded.located)
    order = rows[np.argsort(np.exp(log_probs[rows, 0]), kind="stable")]  # P(Normal/Mild), lowest first
    chosen, seen = [], set()
    for row in order:
        key = (int(graded.study_id[row]), int(graded.target[row]) // len(LEVELS))
        if key not in seen:
            seen.add(key)
            chosen.append(row)
        if len(chosen) == count:
            break
    return np.asarray(chosen, dtype=np.int64)


def write_report_page(report: Path, summary: Mapping[str, Any], pictures: Mapping[str, Any], metrics_text: str) -> Path:
    """``report/index.html``: everything of the demo's report, in reading order."""
    zero_shot = summary["zero_shot"]
    scores = pd.DataFrame([{"whole pipeline": f"{summary['official_score']:.4f}",
                            "detect stage alone": f"{summary['fusion_only_score']:.4f}",
                            "prior only": f"{summary['prior_score']:.4f}",
                            "oracle floor": f"{summary['oracle_score']:.4f}",
                            "gap closed": f"{summary['gap_closed']:.0%}"}]).to_html(index=False)
    sections = [
        ("Held-out score", f"<p>Official RSNA score (weighted log loss, lower is better) on the held-out phantom "
                           f"studies:</p>{scores}<p>Zero-shot severity prompts on {zero_shot['n_crops']} held-out "
                           f"finding crops: balanced accuracy {zero_shot['balanced_accuracy']:.3f} (chance "
                           f"{zero_shot['chance']:.3f}).</p>"),
        ("Training curves of every stage", "<p>Grey: training loss (left axis); colours: the stage's validation "
                                           "metric (right axis).</p>" + image("stage_curves.png", "stage curves")),
        ("Confusion matrix", image("confusion_matrix.png", "confusion matrix")),
        ("Where each finding is, and its grade", "<p>The held-out study with the most findings predicted Moderate "
                                                 "or Severe: predicted points coloured by the final predicted grade, "
                                                 "with its probability; white circles are the recorded label "
                                                 "points.</p>" + "".join(image(p.name, "locations")
                                                                         for p in pictures["overlays"])),
        ("What the grader looked at", (image(pictures["attention"].name, "grader attention")
                                       + "<p>The grader's finding query over its crop, for the findings it found "
                                         "most likely abnormal; the probability is the grader's own, before the "
                                         "study context.</p>") if pictures["attention"] else
         f"<p>{pictures['attention_note']}</p>"),
        ("Grades per level", "<p>The held-out studies with the most findings predicted Moderate or Severe; "
                             "&#10003;: the recorded grade agrees.</p>" + "".join(f"<h3>study {sid}</h3>{grade_table_html(table)}"
                                     for sid, table in pictures["tables"])),
        ("All metrics", preformatted(metrics_text)),
    ]
    return write_index(report, "spinemm demo report", sections)
