"""Tower registries: a config's ``vision.type`` / ``text.type`` picks a builder here (timm style).

A vision builder is ``fn(cfg: VisionConfig, ctx: BuildContext) -> SliceEncoder``; a text builder is
``fn(cfg: TextConfig, ctx: BuildContext) -> TextTower``. Register with the decorators::

    @register_vision("resnet50")
    def _resnet50(cfg, ctx):
        return ResNetSliceEncoder(image_size=cfg.image_size, **cfg.kwargs)

An encoder that owns a pretrained image projection (pooled width -> ``ctx.embed_dim``) may expose
``pop_projection() -> nn.Module | None``; the model then uses it for ``encode_image`` instead of a
fresh Linear. Text towers may do the same for ``encode_text``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SpineModelError
from .hub import MissingHubFiles

#: ``vision.type`` -> builder(cfg: VisionConfig, ctx: BuildContext) -> SliceEncoder
VISION_BUILDERS: dict[str, Callable[..., Any]] = {}
#: ``text.type`` -> builder(cfg: TextConfig, ctx: BuildContext) -> TextTower
TEXT_BUILDERS: dict[str, Callable[..., Any]] = {}


@dataclass
class BuildContext:
    """What builders need beyond their own config section.

    ``embed_dim``: the dual-encoder embedding size. ``load_pretrained``: False while rebuilding a
    saved model (its own weights follow), so builders must not fetch upstream weights then.
    ``source_dir``: the saved folder being loaded (tokenizer files live there), else None.
    ``cache``: shared by the builders of one model, e.g. one upstream checkpoint for both towers.
    ``logit_scale``: set by a builder that loads an aligned image-text checkpoint (its trained temperature).
    """

    embed_dim: int
    load_pretrained: bool = True
    source_dir: Path | None = None
    cache: dict[Any, Any] = field(default_factory=dict)
    logit_scale: float | None = None

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per build for ``key``."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def _register(table: dict[str, Callable[..., Any]], kind: str, name: str) -> Callable[[Callable], Callable]:
    def decorator(fn: Callable) -> Callable:
        old = table.get(name)
        # the same function registering again (a module reload) is fine; a different one is a clash
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise SpineModelError(f"{kind} type {name!r} is already registered by {old.__module__}")
        table[name] = fn
        return fn

    return decorator


def register_vision(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register a vision builder under ``vision.type == name``."""
    return _register(VISION_BUILDERS, "vision", name)


def register_text(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register a text builder under ``text.type == name``."""
    return _register(TEXT_BUILDERS, "text", name)


#: Modules whose import registers the built-in tower builders (the registry names no tower class;
#: these modules import it). ``baselines`` needs timm and is skipped when it is not installed.
BUILDER_MODULES = ("spinemm.models.vision", "spinemm.models.towers", "spinemm.models.baselines")


def import_builders() -> None:
    """Import :data:`BUILDER_MODULES`, so that their builders are registered."""
    for module in BUILDER_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a missing dependency *inside* the module is a real error
                raise


def build_towers(vision_cfg: Any, text_cfg: Any, ctx: BuildContext) -> tuple[Any, Any]:
    """The vision and text towers their configs' ``type`` names; a tower whose upstream files are
    missing does not stop the other, so one :class:`MissingHubFiles` lists every file needed."""
    import_builders()
    vision_builder = _lookup(VISION_BUILDERS, "vision", vision_cfg.type)
    text_builder = _lookup(TEXT_BUILDERS, "text", text_cfg.type)
    towers, missing = [], []
    for builder, cfg in ((vision_builder, vision_cfg), (text_builder, text_cfg)):
        try:
            towers.append(builder(cfg, ctx))
        except MissingHubFiles as exc:  # keep going: one error should list every file the model needs
            missing.append(exc)
    if missing:
        raise MissingHubFiles.merge(missing)
    return towers[0], towers[1]


def _lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    if name not in table:
        raise SpineModelError(f"unknown {kind}.type {name!r}; registered: {sorted(table)}")
    return table[name]
