"""The named model configs (presets): the JSON files of ``spinemm/models/configs`` and any added
with :func:`add_model_config`. Plain data: nothing here builds a model (that is
:mod:`spinemm.models.factory`), so the name parser and the factory can both read the list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import SpineModelError
from .config import ModelConfig

__all__ = ["add_model_config", "list_models", "get_model_config", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).parent / "configs"
_MODEL_CONFIGS: dict[str, dict[str, Any]] = {}


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
    """Names accepted by :func:`~spinemm.models.factory.create_model`."""
    return sorted(_MODEL_CONFIGS)


def get_model_config(name: str) -> dict[str, Any]:
    """A copy of a named config as a plain dict (or of a JSON config file's)."""
    if name in _MODEL_CONFIGS:
        return json.loads(json.dumps(_MODEL_CONFIGS[name]))
    if name.endswith(".json") and Path(name).is_file():
        return json.loads(Path(name).read_text())
    raise SpineModelError(
        f"unknown model {name!r}; available: {list_models()} (or give a path to a JSON config)"
    )


add_model_config(CONFIG_DIR)
