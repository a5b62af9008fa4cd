"""The staged pipeline: stages as objects (detect -> locate -> grade), each a :class:`Stage`,
composed by :class:`SpinePipeline`.

Every stage takes its series from one :class:`~spinemm.data.store.SeriesStore` and passes the next a
:class:`Findings` record; :meth:`SpinePipeline.run` returns every stage's output in a
:class:`PipelineResult`; a pipeline is saved and loaded as one self-describing folder.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_LAZY = {
    "Findings": "spinemm.pipeline.findings",
    "LOCATION_COLUMNS": "spinemm.pipeline.findings",
    "DetectStage": "spinemm.pipeline.detect",
    "preprocess_settings": "spinemm.pipeline.detect",
    "LocateStage": "spinemm.pipeline.locate",
    "axial_slices_from_canal": "spinemm.pipeline.locate",
    "GradeStage": "spinemm.pipeline.grade",
    "Stage": "spinemm.pipeline.stage",
    "StageInput": "spinemm.pipeline.stage",
    "StageOutput": "spinemm.pipeline.stage",
    "register_stage": "spinemm.pipeline.registry",
    "registered_stages": "spinemm.pipeline.registry",
    "SpinePipeline": "spinemm.pipeline.pipeline",
    "PipelineResult": "spinemm.pipeline.result",
    "load_pipeline": "spinemm.pipeline.pipeline",
    "submission_from_probs": "spinemm.pipeline.result",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
