"""Templated metadata text: the query of each (condition, level) target and severity prompts.

The text tower reads what a radiologist would know before looking: which series, which level and
which finding is being graded. Templates are plain functions so users can swap them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .constants import (
    CONDITION_NAMES,
    CONDITION_PLANE,
    CONDITIONS,
    LEVEL_NAMES,
    LEVELS,
    SEVERITIES,
    condition_key,
    level_key,
)

_SEVERITY_WORDS = {
    "Normal/Mild": ("no or mild", "normal or mildly narrowed"),
    "Moderate": ("moderate", "moderately narrowed"),
    "Severe": ("severe", "severely narrowed"),
}


def _names(condition: str, level: str) -> tuple[str, str, str]:
    cond, lev = condition_key(condition), level_key(level)
    if cond not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITION_NAMES}")
    if lev not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVEL_NAMES}")
    return CONDITION_PLANE[cond], LEVEL_NAMES[LEVELS.index(lev)], CONDITION_NAMES[CONDITIONS.index(cond)]


def query_text(condition: str, level: str) -> str:
    """``"Sagittal T2/STIR MRI of the lumbar spine, L4/L5, spinal canal stenosis"``."""
    plane, lev, cond = _names(condition, level)
    return f"{plane} MRI of the lumbar spine, {lev}, {cond.lower()}"


def finding_text(condition: str, level: str, *, description: str | None = None,
                 pixel_spacing_mm: float | None = None, slice_spacing_mm: float | None = None,
                 tilt_degrees: float | None = None) -> str:
    """The grade stage's query for one finding: what is graded, where, and how it was acquired.

    ``"Axial T2, L4/L5, left subarticular stenosis; pixels 0.7 mm, slices 4 mm apart, tilted 10
    degrees"`` (30 tokens for the tiny preset's tokenizer, within its 32). ``description`` is the series description (default: the
    condition's plane); the acquisition values are those of the series the finding was located in
    (:func:`acquisition`), rounded (pixels to 0.1 mm, slices to 0.5 mm, tilt to 5 degrees) so that
    series acquired alike share a text and the text tower encodes each distinct text once.
    """
    plane, lev, cond = _names(condition, level)
    text = f"{description or plane}, {lev}, {cond.lower()}"
    parts = []
    if pixel_spacing_mm is not None:
        parts.append(f"pixels {round(float(pixel_spacing_mm), 1):g} mm")
    if slice_spacing_mm is not None:
        parts.append(f"slices {round(float(slice_spacing_mm) * 2) / 2:g} mm apart")
    if tilt_degrees is not None:
        parts.append(f"tilted {int(round(float(tilt_degrees) / 5) * 5)} degrees")
    return f"{text}; {', '.join(parts)}" if parts else text


def acquisition(series: Any) -> dict[str, float]:
    """``finding_text``'s acquisition keywords of a :class:`~spinemm.data.series.Series`: the
    in-plane pixel spacing (mean of row and column), the gap between slices, and the tilt: the
    angle between the slices' normal and the patient axis it is closest to (0 for a slice square
    to the body, more for an oblique axial slice angled to its disc)."""
    normal = [abs(float(v)) for v in series.normal]
    tilt = math.degrees(math.acos(min(1.0, max(normal) / max(math.hypot(*normal), 1e-12))))
    return {"pixel_spacing_mm": sum(series.pixel_spacing) / 2, "slice_spacing_mm": float(series.slice_spacing),
            "tilt_degrees": tilt}


def finding_texts(series: Any, targets: Iterable[int]) -> list[str]:
    """The :func:`finding_text` of each label column in ``targets`` (indices into
    ``constants.LABEL_COLUMNS``) located in ``series`` (its :func:`acquisition` values)."""
    meta = acquisition(series)
    return [finding_text(CONDITIONS[int(t) // len(LEVELS)], LEVELS[int(t) % len(LEVELS)], **meta) for t in targets]


#: The 25 query texts, aligned with ``constants.LABEL_COLUMNS``.
QUERY_TEXTS: tuple[str, ...] = tuple(query_text(c, lv) for c in CONDITIONS for lv in LEVELS)


def severity_prompts(condition: str, level: str | None = None) -> dict[str, list[str]]:
    """Prompt templates per severity class for zero-shot scoring of one condition.

    Returns ``{"Normal/Mild": [...], "Moderate": [...], "Severe": [...]}``; pass it to
    :func:`spinemm.zero_shot_classify`, which averages each class's template embeddings.
    """
    plane, lev, cond = _names(condition, level or LEVELS[0])  # without a level, only the names are used
    where = f" at {lev}" if level else ""
    out: dict[str, list[str]] = {}
    for sev in SEVERITIES:
        adj, state = _SEVERITY_WORDS[sev]
        out[sev] = [
            f"{plane} MRI of the lumbar spine showing {adj} {cond.lower()}{where}",
            f"{adj} {cond.lower()}{where}",
            f"lumbar spine MRI, {cond.lower()}{where}: the canal is {state}",
        ]
    return out


def vocabulary_corpus() -> list[str]:
    """Every text the library itself generates; the offline tokenizer's vocabulary is built from it."""
    texts = list(QUERY_TEXTS) + [finding_text(c, lv, pixel_spacing_mm=0.7, slice_spacing_mm=4.0, tilt_degrees=10.0)
                                 for c in CONDITIONS for lv in LEVELS]
    for cond in CONDITIONS:
        for lev in (None, *LEVELS):
            for templates in severity_prompts(cond, lev).values():
                texts.extend(templates)
    return texts
