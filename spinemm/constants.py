"""Names of the RSNA 2024 Lumbar Spine task, spelled exactly as in the competition files.

Everything that indexes the 25 (condition, level) targets uses the order of ``LABEL_COLUMNS``:
condition-major, then level. Query ``q`` of the model is ``LABEL_COLUMNS[q]``.
"""

from __future__ import annotations

#: Condition names as written in ``train_label_coordinates.csv``.
CONDITION_NAMES: tuple[str, ...] = (
    "Spinal Canal Stenosis",
    "Left Neural Foraminal Narrowing",
    "Right Neural Foraminal Narrowing",
    "Left Subarticular Stenosis",
    "Right Subarticular Stenosis",
)
#: The same conditions as they appear in ``train.csv`` column names.
CONDITIONS: tuple[str, ...] = tuple(c.lower().replace(" ", "_") for c in CONDITION_NAMES)

#: Level names as written in ``train_label_coordinates.csv``.
LEVEL_NAMES: tuple[str, ...] = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")
#: The same levels as they appear in ``train.csv`` column names.
LEVELS: tuple[str, ...] = tuple(lv.lower().replace("/", "_") for lv in LEVEL_NAMES)

#: Severity strings in ``train.csv``; the index is the integer class label.
SEVERITIES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
#: Probability columns of ``sample_submission.csv``, in class order.
SUBMISSION_COLUMNS: tuple[str, ...] = ("normal_mild", "moderate", "severe")
#: Official sample weight of each true class (DESIGN §2).
SEVERITY_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)
#: Label value for a missing (empty) ``train.csv`` cell.
MISSING_LABEL = -1

#: ``series_description`` values; the index is the plane index used by samples and models.
PLANES: tuple[str, ...] = ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")
#: Short, path- and key-safe plane names, same order as ``PLANES``.
PLANE_KEYS: tuple[str, ...] = ("sag_t1", "sag_t2", "ax_t2")

#: The series plane each condition is read on.
CONDITION_PLANE: dict[str, str] = {
    "spinal_canal_stenosis": "Sagittal T2/STIR",
    "left_neural_foraminal_narrowing": "Sagittal T1",
    "right_neural_foraminal_narrowing": "Sagittal T1",
    "left_subarticular_stenosis": "Axial T2",
    "right_subarticular_stenosis": "Axial T2",
}

#: The 25 ``train.csv`` label columns, condition-major (competition order).
LABEL_COLUMNS: tuple[str, ...] = tuple(f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS)
NUM_TARGETS = len(LABEL_COLUMNS)
NUM_CLASSES = len(SEVERITIES)

#: Plane index of each of the 25 targets, aligned with ``LABEL_COLUMNS``.
TARGET_PLANE_INDEX: tuple[int, ...] = tuple(
    PLANES.index(CONDITION_PLANE[c]) for c in CONDITIONS for _ in LEVELS
)

#: Condition groups of the official metric, keyed by group name.
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "spinal": ("spinal_canal_stenosis",),
    "foraminal": ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"),
    "subarticular": ("left_subarticular_stenosis", "right_subarticular_stenosis"),
}


#: The spinal canal: the condition on the midline, whose point anchors each level.
CANAL: str = CONDITIONS[0]
#: The neural foramina, left and right.
FORAMINA: tuple[str, ...] = METRIC_GROUPS["foraminal"]
#: Each sided condition's side of the midline in DICOM patient x (+x is the patient's left): +1
#: left, -1 right (the canal, on the midline, has none).
CONDITION_SIDE: dict[str, float] = {
    key: 1.0 if name.startswith("Left ") else -1.0
    for key, name in zip(CONDITIONS, CONDITION_NAMES, strict=True) if name.startswith(("Left ", "Right "))
}
#: Each right-sided condition's left counterpart: side folding reads a right finding mirrored, as
#: its left twin (``spinemm.data.sides``).
LEFT_TWIN: dict[str, str] = {c: c.replace("right_", "left_", 1) for c, side in CONDITION_SIDE.items() if side < 0}
#: Short names for figure labels: SCS, L NFN, R NFN, L SS, R SS.
CONDITION_SHORT: dict[str, str] = {
    key: " ".join(filter(None, ({"Left": "L", "Right": "R"}.get(name.split()[0], ""),
                                "".join(w[0] for w in name.split() if w not in ("Left", "Right")))))
    for key, name in zip(CONDITIONS, CONDITION_NAMES, strict=True)
}


def condition_key(name: str) -> str:
    """``"Left Neural Foraminal Narrowing"`` -> ``"left_neural_foraminal_narrowing"``."""
    return name.strip().lower().replace(" ", "_")


def level_key(name: str) -> str:
    """``"L4/L5"`` -> ``"l4_l5"``."""
    return name.strip().lower().replace("/", "_")


def label_column(condition: str, level: str) -> str:
    """Column name for a condition and level, given in either spelling."""
    return f"{condition_key(condition)}_{level_key(level)}"


def target_index(condition: str, level: str) -> int:
    """Index 0..24 of a (condition, level) pair in ``LABEL_COLUMNS``."""
    return LABEL_COLUMNS.index(label_column(condition, level))


def row_id(study_id: int, column: str) -> str:
    """Kaggle ``row_id``, e.g. ``row_id(12345, "spinal_canal_stenosis_l3_l4")``."""
    if column not in LABEL_COLUMNS:
        raise ValueError(f"unknown label column {column!r}")
    return f"{int(study_id)}_{column}"


def parse_row_id(rid: str) -> tuple[int, str]:
    """Inverse of :func:`row_id`: ``"12345_spinal_canal_stenosis_l3_l4"`` -> ``(12345, column)``."""
    study, _, column = str(rid).partition("_")
    if not study.isdigit() or column not in LABEL_COLUMNS:
        raise ValueError(f"malformed row_id {rid!r}: expected '<study_id>_<condition>_<level>'")
    return int(study), column
