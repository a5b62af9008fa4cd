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
filled by ``register_vision`` / ``register_text``); this module imports the modules that register.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import SpineError, SpineModelError
from .config import ModelConfig, merge_overrides
from .hub import PICKLE_SUFFIXES, MissingHubFiles, refuse_pickle, resolve_files
from .names import PIPELINE_CONFIG, parse_model_name
from .registry import TEXT_BUILDERS, VISION_BUILDERS, BuildContext, register_text, register_vision
from .spine_clip import CONFIG_NAME, WEIGHTS_NAME, SpineCLIP

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

_CONFIG_DIR = Path(__file__).parent / "configs"
_MODEL_CONFIGS: dict[str, dict[str, Any]] = {}
#: Modules whose import registers tower builders. baselines/lora are written separately and optional.
_BUILDER_MODULES = ("spinemm.models.vision", "spinemm.models.towers", "spinemm.models.baselines")


def _import_builders() -> None:
    for module in _BUILDER_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a missing dependency *inside* the module is a real error
                raise


def add_model_config(path: str | os.PathLike) -> None:
    """Register a JSON config file, or every ``*.json`` in a folder; the file stem is the name."""
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise SpineModelError(f"no model config JSON at {path}")
    for file in files:
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise SpineModelError(f"{file}: not valid JSON ({exc})") from exc
        ModelConfig.from_dict(data)  # validate now, not at first use
        _MODEL_CONFIGS[file.stem] = data


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODEL_CONFIGS)


def get_model_config(name: str) -> dict[str, Any]:
    """A copy of a named config as a plain dict."""
    if name in _MODEL_CONFIGS:
        return json.loads(json.dumps(_MODEL_CONFIGS[name]))
    if name.endswith(".json") and Path(name).is_file():
        return json.loads(Path(name).read_text())
    raise SpineModelError(
        f"unknown model {name!r}; available: {list_models()} (or give a path to a JSON config)"
    )


def build_model(
    config: ModelConfig, *, load_pretrained: bool = True, source_dir: Path | None = None
) -> SpineCLIP:
    """Build the towers from the registries and assemble a :class:`SpineCLIP`.

    Builders fill resolved upstream details into ``config`` (so saving it rebuilds offline).
    """
    _import_builders()
    ctx = BuildContext(embed_dim=config.embed_dim, load_pretrained=load_pretrained, source_dir=source_dir)
    vision_builder = _lookup(VISION_BUILDERS, "vision", config.vision.type)
    text_builder = _lookup(TEXT_BUILDERS, "text", config.text.type)
    missing: list[MissingHubFiles] = []
    try:
        vision = vision_builder(config.vision, ctx)
    except MissingHubFiles as exc:  # keep going: one error should list every file the model needs
        missing.append(exc)
    try:
        text = text_builder(config.text, ctx)
    except MissingHubFiles as exc:
        missing.append(exc)
    if missing:
        raise MissingHubFiles.merge(missing)
    if ctx.logit_scale is not None:
        config.logit_scale_init = ctx.logit_scale
    image_proj = vision.pop_projection() if hasattr(vision, "pop_projection") else None
    text_proj = text.pop_projection() if hasattr(text, "pop_projection") else None
    return SpineCLIP(config, vision, text, image_proj=image_proj, text_proj=text_proj)


def _lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    if name not in table:
        raise SpineModelError(f"unknown {kind}.type {name!r}; registered: {sorted(table)}")
    return table[name]


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
        data = _saved_config(folder)["model_cfg"]
        if pretrained is None or pretrained is True:
            pretrained = folder
    config = ModelConfig.from_dict(merge_overrides(data, overrides))
    if pretrained is None or isinstance(pretrained, bool):
        return build_model(config, load_pretrained=pretrained is not False, source_dir=folder)
    weights = _weights_file(pretrained)
    model = build_model(config, load_pretrained=False, source_dir=weights.parent)
    _load_weights(model, weights)
    return model


def load_model(source: str | os.PathLike) -> SpineCLIP:
    """A model by name (:mod:`spinemm.models.names`): a saved folder, its ``model.safetensors`` or
    an ``hf-hub:`` repo gives the saved model; a preset or JSON config gives ``create_model(name)``
    (upstream tower weights as configured, fusion and heads untrained)."""
    name = parse_model_name(source, setting="load_model(source)")
    if name.is_config:
        return create_model(name.target)
    return _load_saved(name.saved_folder("load_model(source)"))


def _load_saved(folder: Path) -> SpineCLIP:
    """The model ``save_pretrained`` wrote to ``folder``."""
    meta = _saved_config(folder)
    try:
        model = build_model(ModelConfig.from_dict(meta["model_cfg"]), load_pretrained=False, source_dir=folder)
    except MissingHubFiles:
        raise
    except Exception as exc:  # it parses, but spinemm / torch / transformers / open_clip refuse what it describes
        kind = "" if isinstance(exc, SpineError) else f"{type(exc).__name__}: "
        raise SpineModelError(f"{folder / CONFIG_NAME}: model_cfg does not build a model ({kind}{exc})") from exc
    _load_weights(model, folder / WEIGHTS_NAME)
    return model


def _saved_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a saved model folder, after refusing pickles and pointing pipeline
    folders at ``load_pipeline``."""
    if (folder / PIPELINE_CONFIG).is_file():
        raise SpineModelError(
            f"{folder} is a pipeline folder ({PIPELINE_CONFIG}); load it with spinemm.load_pipeline, or its "
            f"first stage with load_model({str(folder / 'detect')!r})"
        )
    if not (folder / WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            refuse_pickle(folder / pickles[0])
    found = resolve_files(folder, [CONFIG_NAME, WEIGHTS_NAME], setting=str(folder))
    meta = json.loads(found[CONFIG_NAME].read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("model_cfg"), dict):
        raise SpineModelError(f"{found[CONFIG_NAME]} is not a spinemm config (no 'model_cfg' mapping)")
    return meta


def _weights_file(pretrained: str | os.PathLike) -> Path:
    """The ``model.safetensors`` that ``pretrained`` (a folder, a file or ``hf-hub:``) names."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    folder = parse_model_name(pretrained, setting="pretrained").saved_folder("pretrained")
    return resolve_files(folder, [WEIGHTS_NAME], setting="pretrained")[WEIGHTS_NAME]


def _load_weights(model: SpineCLIP, path: Path) -> None:
    from safetensors.torch import load_model as load_safetensors

    refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise SpineModelError(f"{path}: spinemm weights are .safetensors files")
    try:
        load_safetensors(model, str(path), strict=True)
    except RuntimeError as exc:
        raise SpineModelError(f"{path} does not match model {model.config.name!r}: {exc}") from exc


add_model_config(_CONFIG_DIR)
