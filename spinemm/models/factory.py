"""create_model / load_model / list_models: named JSON configs -> :class:`SpineCLIP`, timm style.

``create_model(name, pretrained=None, **overrides)``:

* ``name``: a preset (``list_models()``), a config added with :func:`add_model_config`, or a path
  to a JSON config file.
* ``overrides`` merge into the config, dotted or nested: ``create_model("spine-tiny",
  **{"fusion.layers": 4})`` or ``create_model("spine-tiny", fusion={"layers": 4})``.
* ``pretrained``: ``None``/``True`` = the towers' upstream weights as configured; ``False`` = none
  (architecture only); a folder, ``.safetensors`` file or hub repo of a saved spinemm model = those
  weights on this architecture.

Tower builders come from :mod:`spinemm.models.registry` (``VISION_BUILDERS`` / ``TEXT_BUILDERS``,
filled by ``register_vision`` / ``register_text``); the presets from :mod:`spinemm.models.presets`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import SpineModelError, unknown_key
from .config import ModelConfig, merge_overrides
from .hub import resolve_files
from .names import parse_model_name
from .presets import add_model_config, get_model_config, list_models
from .registry import TEXT_BUILDERS, VISION_BUILDERS, register_text, register_vision
from .saved import WEIGHTS_NAME, load_weights, read_saved_config
from .spine_clip import SpineCLIP

__all__ = [
    "create_model",
    "load_model",
    "list_models",
    "add_model_config",
    "get_model_config",
    "build_model",
    "VISION_BUILDERS",
    "TEXT_BUILDERS",
    "register_vision",
    "register_text",
]

def build_model(
    config: ModelConfig, *, load_pretrained: bool = True, source_dir: Path | None = None
) -> SpineCLIP:
    """Build the towers from the registries and assemble a :class:`SpineCLIP`
    (:meth:`SpineCLIP.from_config`)."""
    return SpineCLIP.from_config(config, load_pretrained=load_pretrained, source_dir=source_dir)


def create_model(
    name: str | os.PathLike, pretrained: bool | str | os.PathLike | None = None, **overrides: Any
) -> SpineCLIP:
    """A :class:`SpineCLIP` from a model name (:mod:`spinemm.models.names`; the module docstring
    explains ``pretrained`` and ``overrides``). A saved folder or ``hf-hub:`` repo gives its own
    architecture and, unless ``pretrained=False``, its own weights."""
    source = parse_model_name(name, setting="create_model(name)")
    folder = None if source.is_config else source.saved_folder("create_model(name)")
    if folder is None:
        data = get_model_config(source.target)
        data.setdefault("name", Path(source.target).stem if source.kind == "file" else source.target)
    else:
        data = read_saved_config(folder)["model_cfg"]
        if pretrained is None or pretrained is True:
            pretrained = folder
    config = ModelConfig.from_dict(merge_overrides(data, overrides))
    if pretrained is None or isinstance(pretrained, bool):
        return build_model(config, load_pretrained=pretrained is not False, source_dir=folder)
    weights = _weights_file(pretrained)
    model = build_model(config, load_pretrained=False, source_dir=weights.parent)
    load_weights(model, weights)
    return model


LOAD_OPTIONS = ("revision", "torch_dtype", "device", "map_location")


def load_model(source: str | os.PathLike, **options: Any) -> SpineCLIP:
    """A model by name (:mod:`spinemm.models.names`), in eval mode: a saved folder, its
    ``model.safetensors`` or an ``hf-hub:`` repo gives the saved model; a preset or JSON config
    gives ``create_model(name)`` (upstream tower weights as configured, fusion and heads untrained).
    ``options``: ``revision`` (hub names only), ``torch_dtype``, ``device`` / ``map_location``, as
    :meth:`SpineCLIP.from_pretrained`; any other keyword is refused with the nearest one named."""
    unknown = sorted(set(options) - set(LOAD_OPTIONS))
    if unknown:
        raise unknown_key(unknown[0], LOAD_OPTIONS, "load_model")
    name = parse_model_name(source, setting="load_model(source)")
    if not name.is_config:
        return SpineCLIP.from_pretrained(source, **options)
    if options.get("revision") is not None:
        raise SpineModelError(f"load_model: revision= needs a hub name (hf-hub:org/name), not the preset {source!r}")
    model = create_model(name.target)
    if options.get("torch_dtype") is not None:
        model = model.to(dtype=options["torch_dtype"])
    device = options.get("device") if options.get("device") is not None else options.get("map_location")
    return (model.to(device) if device is not None else model).eval()


def _weights_file(pretrained: str | os.PathLike) -> Path:
    """The ``model.safetensors`` that ``pretrained`` (a folder, a file or ``hf-hub:``) names."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    folder = parse_model_name(pretrained, setting="pretrained").saved_folder("pretrained")
    return resolve_files(folder, [WEIGHTS_NAME], setting="pretrained")[WEIGHTS_NAME]
