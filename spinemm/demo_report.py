"""The demo's pictures and its one-page report (``report/index.html``), in the order a
clinician-researcher reads them: scores, every stage's training curves, the confusion matrix, where
each finding was placed and graded, what the grader looked at, and each study's grades per level.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .constants import CONDITIONS, LEVELS, SEVERITIES
from .marks import inside_image
from .report import (
    better,
    flat_metrics,
    grade_table,
    grade_table_html,
    image,
    metrics_table_html,
    recorded_grades,
    write_index,
)
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
                    truth: pd.DataFrame, histories: Mapping[str, list],
                    validation: tuple[Any, Any, pd.DataFrame] | None = None) -> dict[str, Any]:
    """Write the report's pictures; returns their paths, the grade tables and how many located
    points lie outside their image (``"outside"``: ``(outside, located)``). ``validation``:
    ``(result, store, train tables)`` of a study with recorded points, drawn in a second overlay."""
    stages = [{"title": STAGE_CURVES[name][0], "history": history, "keys": STAGE_CURVES[name][1]}
              for name, history in histories.items()]
    submission = result.submission()
    shown = most_abnormal_studies(submission, N_TABLES)  # the overlay and the tables show the same studies
    locations = result.locations()
    pictures: dict[str, Any] = {
        "stage_curves": stage_curves_png(stages, report / "stage_curves.png"),
        "single_epoch": [STAGE_CURVES[name][0] for name, history in histories.items() if len(history) == 1],
        "overlays": location_overlays(root, locations[locations.study_id == shown[0]], report, split="test",
                                      max_studies=1, truth=truth, store=store, submission=submission),
        "validation_overlays": [] if validation is None else location_overlays(
            root, validation[0].locations(), report, split="train", max_studies=1, truth=validation[2],
            store=validation[1], submission=validation[0].submission()),
        "attention": None, "attention_note": "",
        "tables": [(sid, grade_table(submission, sid, solution)) for sid in shown],
    }
    findings = result.findings
    inside = points_inside(findings, store)
    located = findings.instance_number >= 0
    pictures["outside"] = (int((located & ~inside).sum()), int(located.sum()))
    if pipeline.grade is None or type(pipeline.grade.grader).__name__ != "CropGrader":
        pictures["attention_note"] = "This pipeline's grader has no query cross-attention to show (not the clip grader)."
        return pictures
    rows = explained_rows(result.grade_log_probs, result.graded, N_EXPLAINED, points_inside(result.graded, store))
    seen = pipeline.grade.attention(result.graded, store, rows)
    recorded = recorded_grades(solution)
    items = []
    for i, row in enumerate(rows):
        graded = result.graded
        study, target = int(graded.study_id[row]), int(graded.target[row])
        condition, level = CONDITIONS[target // len(LEVELS)], LEVELS[target % len(LEVELS)]
        probs = np.exp(result.grade_log_probs[row])  # the stage's grade (its passes' mean), not the last read
        grade = SEVERITIES[int(probs.argmax())]
        truth_grade = recorded.get((study, f"{condition}_{level}"), "not recorded")
        shape = store.get(study, int(graded.series_id[row])).volume.shape
        outside = None if inside_image(graded.x[row], graded.y[row], shape) else (
            f"at ({graded.x[row]:.0f}, {graded.y[row]:.0f}) on a {shape[2]} x {shape[1]} px slice")
        items.append({"crop": seen["crops"][i], "attention": seen["attention"][i], "outside": outside,
                      "title": f"study {study}\n{finding_label(condition, level)}: {grade} {probs.max():.0%}\n"
                               f"recorded {truth_grade}"})
    pictures["attention"] = attention_png(items, report / "grader_attention.png",
                                          title="the grader's query: cross-attention over its crop (last layer)")
    return pictures


def points_inside(findings: Any, store: Any) -> np.ndarray:
    """Per finding of a :class:`~spinemm.pipeline.findings.Findings`, whether its point lies on its
    slice's image (False where not located or its series cannot be read)."""
    inside = np.zeros(len(findings.study_id), dtype=bool)
    for row in np.flatnonzero(findings.instance_number >= 0):
        series = store.find(int(findings.study_id[row]), int(findings.series_id[row]), "checked")
        inside[row] = series is not None and inside_image(findings.x[row], findings.y[row], series.volume.shape)
    return inside


def most_abnormal_studies(submission: pd.DataFrame, count: int) -> list[int]:
    """The studies with the most findings predicted Moderate or Severe (ties: submission order)."""
    grades = predicted_grades(submission)
    abnormal = (grades.grade != SEVERITIES[0]).groupby(grades.study_id, sort=False).sum()
    return [int(s) for s in abnormal.sort_values(ascending=False, kind="stable").index[:count]]


def explained_rows(log_probs: np.ndarray, graded: Any, count: int, inside: np.ndarray | None = None) -> np.ndarray:
    """The graded findings most likely abnormal (Moderate or Severe), one per (study, condition);
    with ``inside`` (per finding), those whose point lies on its image come first, so the picture
    shows crops where there are any (the rest are drawn flagged, never as black squares)."""
    rows = np.flatnonzero(~np.isnan(log_probs[:, 0]) & graded.located)
    off = np.zeros(len(rows), dtype=bool) if inside is None else ~inside[rows]
    order = rows[np.lexsort((np.exp(log_probs[rows, 0]), off))]  # inside first, then P(Normal/Mild) lowest first
    chosen, seen = [], set()
    for row in order:
        key = (int(graded.study_id[row]), int(graded.target[row]) // len(LEVELS))
        if key not in seen:
            seen.add(key)
            chosen.append(row)
        if len(chosen) == count:
            break
    return np.asarray(chosen, dtype=np.int64)


def reading_notes(summary: Mapping[str, Any]) -> dict[str, str]:
    """Notes on numbers that mean "learnt nothing yet", by dotted metric name: below (or at)
    chance, no better than the prior or a uniform guess, no located level within 5 mm."""
    chance = summary.get("zero_shot", {}).get("chance", 1 / len(SEVERITIES))
    uniform = float(np.log(len(SEVERITIES)))  # the log loss of 1/3 for every grade, whatever the weights
    prior = summary.get("prior_score")
    notes = {}
    flat = dict(flat_metrics(summary))
    for name, value in flat.items():
        last = name.rsplit(".", 1)[-1]
        if last == "balanced_accuracy":
            if value < chance - 1e-9:
                notes[name] = f"below chance ({chance:.3f})"
            elif value < chance + 1e-9:
                notes[name] = f"at chance ({chance:.3f}): one grade for everything"
        elif better(name) == "lower is better" and (last.endswith("score") or last == "log_loss"
                                                   or name.startswith("evaluation.official.")):
            # a log loss: against the prior's where it is the headline score, else against 1/3 each
            if last in ("official_score", "fusion_only_score") and prior is not None and value >= prior:
                notes[name] = f"no better than the prior alone ({prior:.4f})"
            elif value >= uniform:
                notes[name] = f"no better than 1/3 for every grade ({uniform:.3f})"
        elif last == "gap_closed" and value <= 0:
            notes[name] = "the model is no better than the prior"
        elif (last.endswith("within_5mm") and value == 0) or (
                last.endswith("median_mm") and flat.get(name.replace("median_mm", "within_5mm")) == 0):
            notes[name] = "no located level within 5 mm"
    return notes


def write_report_page(report: Path, summary: Mapping[str, Any], pictures: Mapping[str, Any]) -> Path:
    """``report/index.html``: everything of the demo's report, in reading order. ``summary`` is
    the dict written to ``metrics.json``; every number in it is on the page ("All metrics")."""
    notes = reading_notes(summary)
    sections = [("Held-out score", _scores(summary, notes, pictures["outside"]))]
    sections[0:0] = [("Read this first", _warnings(summary, notes, pictures))] if (
        summary.get("smoke_run") or notes or pictures["outside"][0]) else []
    single = pictures.get("single_epoch", ())
    curves_note = (f'<p class="note">One epoch, so one point and no curve: {html.escape("; ".join(single))}.</p>'
                   if single else "")
    sections += [
        ("Training curves of every stage", "<p>Grey: training loss (left axis, lower is better); colours: the "
                                           "stage's validation metric (right axis; a score or an error in mm: lower "
                                           "is better, an accuracy: higher).</p>" + curves_note
         + image("stage_curves.png", "stage curves")),
        ("Confusion matrix", image("confusion_matrix.png", "confusion matrix")),
        ("Where each finding is, and its grade", "<p>The held-out study with the most findings predicted Moderate "
                                                 "or Severe, one panel per slice holding a predicted or a recorded "
                                                 "point, so every finding is drawn. Hollow markers: predicted "
                                                 "points, coloured by the final predicted grade (its probability "
                                                 "is listed under the panel); white markers: the recorded label "
                                                 "points (where the split has them). Circle: spinal canal, square: "
                                                 "left, diamond: right; an X at the edge: a point outside the "
                                                 "image.</p>"
         + "".join(image(p.name, "locations") for p in pictures["overlays"])
         + ("<p>The held-out studies have no recorded points (neither has Kaggle's test split). A validation "
            "study (train split; no stage trained on it), with its recorded points:</p>"
            + "".join(image(p.name, "locations, validation study") for p in pictures["validation_overlays"])
            if pictures.get("validation_overlays") else "")),
        ("What the grader looked at", (image(pictures["attention"].name, "grader attention")
                                       + "<p>The grader's finding query over its crop, for the findings it found "
                                         "most likely abnormal (those whose point lies on its image first; any "
                                         "other is flagged, as its crop is empty); the probability is the grader's "
                                         "own, before the study context. The colour bar gives each map's range of "
                                         "token weights.</p>") if pictures["attention"] else
         f"<p>{pictures['attention_note']}</p>"),
        ("Grades per level", "<p>The held-out studies with the most findings predicted Moderate or Severe; "
                             "&#10003;: the recorded grade agrees.</p>" + "".join(f"<h3>study {sid}</h3>{grade_table_html(table)}"
                                     for sid, table in pictures["tables"])),
        ("All metrics", "<p>Every number of <code>metrics.json</code> but the settings and timings.</p>"
         + metrics_table_html(summary, notes)),
    ]
    return write_index(report, "spinemm demo report", sections)


def _warnings(summary: Mapping[str, Any], notes: Mapping[str, str], pictures: Mapping[str, Any]) -> str:
    """The box above the scores: a smoke run says so; numbers that mean "nothing learnt" are named."""
    parts = []
    if summary.get("smoke_run"):
        st = summary["settings"]
        parts.append(f"<p><b>Smoke run</b> (<code>spinemm demo --quick</code>): {st['n_studies']} training and "
                     f"{st['n_test']} held-out phantom studies at {st['phantom_size']} px, {st['epochs']} epoch(s) "
                     "per stage. It shows that every step runs end to end; its numbers say nothing about the "
                     "model. Scores no better than the prior, accuracies at or below chance and located points "
                     "off the image are expected here. <code>spinemm demo</code> (<code>make demo</code>) "
                     "writes the real report.</p>")
    outside, located = pictures["outside"]
    if outside:
        parts.append(f"<p>{outside} of {located} located points lie outside their image (the overlay draws them "
                     "as an X at the edge; the grader read an empty crop there).</p>")
    if notes:
        items = "".join(f"<li><code>{html.escape(k)}</code> {summary_value(summary, k):.4g}: {html.escape(v)}</li>"
                        for k, v in notes.items())
        parts.append(f"<p>Numbers that mean the model has not learnt this yet:</p><ul>{items}</ul>")
    return f'<div class="warning">{"".join(parts)}</div>'


def summary_value(summary: Mapping[str, Any], name: str) -> float:
    return dict(flat_metrics(summary))[name]


def _scores(summary: Mapping[str, Any], notes: Mapping[str, str], outside: tuple[int, int]) -> str:
    """The headline numbers, each with which way is better and its note."""
    zero_shot, val = summary["zero_shot"], (summary.get("grader") or {}).get("val") or {}
    rows = [("Official RSNA score, whole pipeline (weighted log loss)", "official_score", f"{summary['official_score']:.4f}"),
            ("the detect stage alone", "fusion_only_score", f"{summary['fusion_only_score']:.4f}"),
            ("prior only (knows nothing)", "prior_score", f"{summary['prior_score']:.4f}"),
            ("oracle floor (perfect)", "oracle_score", f"{summary['oracle_score']:.4f}"),
            ("gap from prior to oracle closed", "gap_closed", f"{summary['gap_closed']:.0%}"),
            (f"zero-shot balanced accuracy, {zero_shot['n_crops']} held-out finding crops (chance "
             f"{zero_shot['chance']:.3f})", "zero_shot.balanced_accuracy", f"{zero_shot['balanced_accuracy']:.3f}")]
    if np.isfinite(val.get("locator_val_median_mm", np.nan)):
        rows += [("level locator, median error on validation levels (mm)", "grader.val.locator_val_median_mm",
                  f"{val['locator_val_median_mm']:.1f}"),
                 ("level locator, share within 5 mm", "grader.val.locator_val_within_5mm",
                  f"{val['locator_val_within_5mm']:.0%}")]
    body = "".join(f"<tr><td>{html.escape(text)}</td><td>{value}</td><td>{better(key)}</td>"
                   f'<td class="note">{html.escape(notes.get(key, ""))}</td></tr>' for text, key, value in rows)
    body += (f"<tr><td>located points outside their image</td><td>{outside[0]} of {outside[1]}</td>"
             "<td>lower is better</td><td></td></tr>")
    return ("<p>On the held-out phantom studies:</p><table class=\"scores\"><tr><th>what</th><th>value</th>"
            f"<th>better</th><th>note</th></tr>{body}</table>")
