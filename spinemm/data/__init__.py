"""Reading RSNA-layout studies: tables, DICOM series, the phantom dataset, model-ready samples."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_tables": "spinemm.data.tables",
    "to_hf_dataset": "spinemm.data.tables",
    "series_path": "spinemm.data.tables",
    "load_series_descriptions": "spinemm.data.tables",
    "read_series": "spinemm.data.dicom",
    "map_point": "spinemm.data.dicom",
    "Series": "spinemm.data.dicom",
    "make_phantom": "spinemm.data.phantom",
    "SpineDataset": "spinemm.data.dataset",
    "collate": "spinemm.data.dataset",
    "SeriesCache": "spinemm.data.cache",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spinemm.data' has no attribute {name!r}")
