"""Templated metadata text: the query of each (condition, level) target and severity prompts.

The text tower reads what a radiologist would know before looking: which series, which level and
which finding is being graded. Templates are plain functions so users can swap them.
"""

from __future__ import annotations

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


#: The 25 query texts, aligned with ``constants.LABEL_COLUMNS``.
QUERY_TEXTS: tuple[str, ...] = tuple(query_text(c, lv) for c in CONDITIONS for lv in LEVELS)


def severity_prompts(condition: str, level: str | None = None) -> dict[str, list[str]]:
    """Prompt templates per severity class for zero-shot scoring of one condition.

    Returns ``{"Normal/Mild": [...], "Moderate": [...], "Severe": [...]}``; pass it to
    :func:`spinemm.zero_shot_classify`, which averages each class's template embeddings.
    """
    plane, lev, cond = _names(condition, level or "L4/L5")
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
    texts = list(QUERY_TEXTS)
    for cond in CONDITIONS:
        for lev in (None, *LEVELS):
            for templates in severity_prompts(cond, lev).values():
                texts.extend(templates)
    return texts
