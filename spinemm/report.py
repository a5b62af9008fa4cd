"""Human-readable results: metric tables in the terminal and location overlays on the original slices."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .constants import PLANES, SEVERITIES, TARGET_PLANE_INDEX, target_index
from .viz import CONDITION_COLORS, _short, plot_slices_with_points


def format_metrics(result: Mapping[str, Any]) -> str:
    """Pretty-print the dict of :func:`spinemm.metrics.evaluate_frames`."""
    official = result["official"]
    lines = [f"official score {official['score']:.4f}  (lower is better)"]
    lines += [f"  {k:<18} {official[k]:.4f}" for k in ("spinal", "foraminal", "subarticular", "any_severe_spinal")]
    report = result["classification"]
    lines.append(
        f"accuracy {report['accuracy']:.3f}  balanced accuracy {report['balanced_accuracy']:.3f}  "
        f"macro precision {report['macro_precision']:.3f}  recall {report['macro_recall']:.3f}  "
        f"F1 {report['macro_f1']:.3f}"
    )
    per_class = report["per_class"]
    lines.append("  class          precision  recall  f1     support")
    for name in SEVERITIES:
        c = per_class[name]
        lines.append(f"  {name:<14} {c['precision']:.3f}      {c['recall']:.3f}   {c['f1']:.3f}  {c['support']}")
    lines.append("confusion matrix (rows true, columns predicted): " + str(report["confusion_matrix"]))
    return "\n".join(lines)


def location_overlays(root: str | Path, locations: pd.DataFrame, out_dir: str | Path, split: str = "test",
                      max_studies: int = 3, truth: pd.DataFrame | None = None) -> list[Path]:
    """One PNG per study: each plane's most-predicted slice with predicted points (and true ones if given).

    ``locations`` is the frame of :func:`spinemm.predict`; ``truth`` the long frame of
    :func:`spinemm.data.load_tables`, whose label points are drawn as small white crosses.
    """
    from .data.dicom import read_series
    from .data.tables import series_path

    out_dir = Path(out_dir)
    paths = []
    for study_id in list(dict.fromkeys(locations.study_id))[:max_studies]:
        rows = locations[(locations.study_id == study_id) & (locations.series_id >= 0)]
        panels = []
        for plane_index, plane in enumerate(PLANES):
            plane_rows = rows[[TARGET_PLANE_INDEX[target_index(r.condition, r.level)] == plane_index
                               for r in rows.itertuples()]]
            if plane_rows.empty:
                continue
            series_id = int(plane_rows.series_id.iloc[0])
            series = read_series(series_path(root, split, int(study_id), series_id))
            instance = int(plane_rows.instance_number.mode().iloc[0])
            on_slice = plane_rows[plane_rows.instance_number == instance]
            points = [(r.x, r.y, _short(r.condition, r.level), CONDITION_COLORS[r.condition]) for r in on_slice.itertuples()]
            if truth is not None:
                t = truth[(truth.study_id == study_id) & (truth.series_id == series_id) & (truth.instance_number == instance)]
                points += [(r.x, r.y, "", "white") for r in t.itertuples()]
            panels.append({"image": series.volume[series.instance_to_index[instance]], "points": points,
                           "title": f"{plane} · instance {instance}"})
        if panels:
            paths.append(plot_slices_with_points(panels, out_dir / f"study_{int(study_id)}.png",
                                                 title=f"study {int(study_id)}: predicted locations"))
    return paths

