"""Reading RSNA-layout studies: tables, DICOM series, the phantom dataset, model-ready samples."""

from __future__ import annotations

from .._lazy import lazy_getattr

_LAZY = {
    "load_tables": "spinemm.data.tables",
    "to_hf_dataset": "spinemm.data.tables",
    "series_path": "spinemm.data.tables",
    "load_series_descriptions": "spinemm.data.tables",
    "read_series": "spinemm.data.dicom",
    "map_point": "spinemm.data.series",
    "Series": "spinemm.data.series",
    "make_phantom": "spinemm.data.phantom",
    "SpineDataset": "spinemm.data.dataset",
    "collate": "spinemm.data.dataset",
    "study_split": "spinemm.data.dataset",
    "kfold_split": "spinemm.data.dataset",
    "SeriesCache": "spinemm.data.cache",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
