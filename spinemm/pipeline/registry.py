"""The stages a pipeline folder may name, in the order they run.

The built-in stages (detect -> locate -> grade) are registered here; :func:`register_stage` adds
one more (a :class:`~spinemm.pipeline.stage.Stage` subclass with a ``name``) after them::

    @register_stage
    class Calibrate(Stage):
        name = "calibrate"
        def run(self, inputs): ...

``load_pipeline`` then reads a folder whose ``pipeline.json`` lists it, and
``SpinePipeline(...)`` orders it after the stages registered before it.
"""

from __future__ import annotations

from ..errors import SpineModelError
from .detect import DetectStage
from .grade import GradeStage
from .locate import LocateStage
from .stage import Stage

__all__ = ["register_stage", "stage_class", "registered_stages", "stage_rank"]

_REGISTRY: dict[str, type[Stage]] = {}  # in registration order: the order stages run in


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Register a stage class under its ``name``; stages run in registration order. Usable as a
    decorator; registering the same class again does nothing."""
    if not (isinstance(cls, type) and issubclass(cls, Stage)) or not cls.name:
        raise SpineModelError(f"register_stage takes a Stage subclass with a name, got {cls!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise SpineModelError(f"a stage named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def registered_stages() -> list[str]:
    """Every registered stage name, in the order stages run."""
    return list(_REGISTRY)


def stage_class(name: str) -> type[Stage]:
    """The registered stage class called ``name``."""
    if name not in _REGISTRY:
        raise SpineModelError(f"unknown stage {name!r}; registered stages: {list(_REGISTRY)}")
    return _REGISTRY[name]


def stage_rank(name: str) -> int:
    """Where stage ``name`` runs (its registration index)."""
    return list(_REGISTRY).index(stage_class(name).name)


for _builtin in (DetectStage, LocateStage, GradeStage):
    register_stage(_builtin)
