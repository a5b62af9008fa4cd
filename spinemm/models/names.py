"""How spinemm reads a model name: the same in Python, the CLI and the recipes (open_clip style).

A name is, checked in this order:

1. ``hf-hub:org/name``: a hub repo holding a saved model or pipeline folder;
2. a preset (``spinemm.list_models()``, or a config added with ``add_model_config``);
3. an existing local folder written by ``save_pretrained`` (a model or a pipeline);
4. an existing local file: a JSON model config, or the ``model.safetensors`` of a saved folder.

Anything else fails at once and never touches the network. A bare ``org/name`` is not taken for a
hub repo (write ``hf-hub:org/name``), so a mistyped local path or preset cannot wait on the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import SpineModelError
from .hub import download_repo, refuse_pickle
from .presets import list_models

HF_HUB_PREFIX = "hf-hub:"
#: The file that marks a pipeline folder (:mod:`spinemm.pipeline`) rather than a single model's.
PIPELINE_CONFIG = "pipeline.json"
#: What a name can be, for error messages.
NAME_FORMS = "a preset, a saved model or pipeline folder, a JSON config or .safetensors file, or hf-hub:org/name"


@dataclass(frozen=True)
class ModelName:
    """A parsed model name. ``kind``: hub, preset, folder or file; ``target``: the repo id, the
    preset name or the local path; ``name``: what was given."""

    kind: Literal["hub", "preset", "folder", "file"]
    target: str
    name: str

    @property
    def is_config(self) -> bool:
        """An architecture only (a preset or a JSON config), no trained weights."""
        return self.kind == "preset" or (self.kind == "file" and self.target.lower().endswith(".json"))

    def saved_folder(self, setting: str, revision: str | None = None) -> Path:
        """The local folder of a saved model or pipeline (hub repos are downloaded or read from the
        hub cache, at ``revision`` when given). Raises for a preset or JSON config, and refuses
        pickle files."""
        if self.kind == "hub":
            return download_repo(self.target, setting=setting, revision=revision)
        if self.kind == "folder":
            return Path(self.target)
        if self.kind == "file":
            path = Path(self.target)
            refuse_pickle(path)
            if path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
                return path.parent
            raise SpineModelError(
                f"{setting}={self.name!r} is a file but not a JSON config nor the model.safetensors of a "
                f"saved folder (with its config.json beside it); give the folder save_pretrained wrote"
            )
        raise SpineModelError(
            f"{setting}={self.name!r} is a preset: an architecture with no trained weights of its own; "
            f"give a saved folder, a .safetensors file or hf-hub:org/name"
        )


def parse_model_name(name: str | os.PathLike, *, setting: str = "model") -> ModelName:
    """Classify ``name`` (module docstring) without any network access.

    ``setting`` names the argument or config key in error messages (e.g. ``"--model"``).
    """
    text = os.fspath(name)
    if isinstance(name, str) and text.startswith(HF_HUB_PREFIX):
        return ModelName("hub", _repo_id(text.removeprefix(HF_HUB_PREFIX), setting), text)
    if isinstance(name, str) and text in list_models():
        return ModelName("preset", text, text)
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelName("folder", str(path), text)
    if path.is_file():
        return ModelName("file", str(path), text)
    hint = ""
    if path.suffix or "/" in text:  # meant as a path
        hint = f"; no such file or folder: {path.resolve()}"
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        hint += f"; for a hub repo write hf-hub:{text}"
    raise SpineModelError(
        f"unknown model {text!r} for {setting}: not a preset {list_models()}, nor an existing local folder "
        f"or file{hint}. A model name is {NAME_FORMS}."
    )


def _repo_id(repo: str, setting: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise SpineModelError(f"{setting}: {HF_HUB_PREFIX}{repo} is not a valid hub repo id ({exc})") from None
    return repo
