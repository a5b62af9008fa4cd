"""Each series' plane from its geometry, never from its description alone.

``{split}_series_descriptions.csv`` says which series is "Sagittal T1", "Sagittal T2/STIR" or
"Axial T2", and :class:`~spinemm.data.SpineDataset` picks one series per plane from it. A
description can be wrong (two descriptions swapped, a re-sent series), and an axial stack read as
sagittal gives confident nonsense. So the plane a series' slices lie in is read from its
ImageOrientationPatient (``Series.plane``, carried by every preprocessed stack) and compared with
the plane it was picked for, at the moment the series is read for that plane: the series is read
once (by the :class:`~spinemm.data.store.SeriesStore` that every stage shares) and no extra header
is opened, because the check needs nothing the read does not already give.

Where they disagree, a warning names the study and the series, and the geometry is trusted: the
series is not used as the plane its description claims, but moved to a plane its slices show when
that plane's slot is free (an "Axial T2" whose slices are sagittal fills a sagittal slot left empty,
e.g. by the swapped series; which sagittal weighting it is, T1 or T2/STIR, the geometry cannot
tell, so it takes the first free one), else left out. A series whose slices mix planes never gets
here: :func:`~spinemm.data.read_series` refuses it with a SpineDataError naming the folder.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

from spinemm.constants import PLANES

__all__ = ["DESCRIBED_GEOMETRY", "assign_by_geometry"]

#: The plane a series' slices lie in, for each description of ``PLANES``.
DESCRIBED_GEOMETRY: dict[str, str] = {"Sagittal T1": "sagittal", "Sagittal T2/STIR": "sagittal", "Axial T2": "axial"}


def assign_by_geometry(study_id: int, chosen: Sequence[int], geometry: Mapping[int, str | None]) -> list[int]:
    """Series id per plane (``PLANES`` order, -1 where none) after checking each chosen series'
    ``geometry`` (series id -> "sagittal" / "coronal" / "axial", None when the files record no
    orientation: then the description stands) against the plane it was chosen for (module docstring).
    Each disagreement is a warning naming the study and the series."""
    out = [int(s) for s in chosen]
    moved: list[int] = []
    for plane, series_id in enumerate(chosen):
        shown = geometry.get(int(series_id)) if series_id >= 0 else None
        if shown is None or shown == DESCRIBED_GEOMETRY[PLANES[plane]]:
            continue
        out[plane] = -1
        moved.append(int(series_id))
        warnings.warn(
            f"study {study_id} series {series_id}: described as {PLANES[plane]!r} in the series descriptions, "
            f"but its ImageOrientationPatient puts its slices in the {shown} plane; the geometry is trusted "
            f"and the series is not read as {PLANES[plane]!r}", stacklevel=3)
    for series_id in moved:
        free = [p for p in range(len(PLANES))
                if out[p] < 0 and DESCRIBED_GEOMETRY[PLANES[p]] == geometry[series_id] and series_id not in out]
        if free:
            out[free[0]] = series_id
    return out
