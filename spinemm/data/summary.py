"""A text summary of an RSNA-layout folder: studies, series per plane, labels, and the gaps."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..constants import CONDITIONS, PLANES, SEVERITIES


def _table(frame: pd.DataFrame) -> str:
    text = frame.to_string()
    return "\n".join("  " + line for line in text.splitlines())


def summarize(root: str | Path, split: str = "train") -> str:
    """Counts of studies and series per plane, the label distribution per condition and what is missing."""
    from .tables import load_series_descriptions, load_tables

    frame = load_tables(root, split)
    series = load_series_descriptions(root, split)
    n_studies = frame.study_id.nunique()
    lines = [f"{Path(root)} [{split}]: {n_studies} studies, {len(series)} series"]

    per_study = series.groupby(["study_id", "series_description"]).size().unstack(fill_value=0)
    per_study = per_study.reindex(index=sorted(frame.study_id.unique()), columns=list(PLANES), fill_value=0)
    counts = pd.DataFrame({
        "series": per_study.sum(),
        "studies without": (per_study == 0).sum(),
        "studies with 2+": (per_study >= 2).sum(),
    })
    lines += ["series per plane:", _table(counts)]

    if split == "train":
        labelled = frame[frame.label >= 0]
        dist = (labelled.groupby("condition").label.value_counts().unstack(fill_value=0)
                .reindex(index=list(CONDITIONS), columns=range(len(SEVERITIES)), fill_value=0))
        dist.columns = list(SEVERITIES)
        lines += ["labels per condition:", _table(dist)]
        lines.append(f"empty label cells: {int((frame.label < 0).sum())} of {len(frame)}")
        has_label = frame.label >= 0
        no_coord = int((has_label & frame.instance_number.isna()).sum())
        lines.append(f"labelled rows without a coordinate: {no_coord}")
    no_series = int((frame.series_id < 0).sum())
    lines.append(f"rows whose plane has no series: {no_series}")
    return "\n".join(lines)
