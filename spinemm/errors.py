"""Exceptions raised by spinemm. All are ValueErrors so callers can catch bad input broadly."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpineError(ValueError):
    """Base class of spinemm's errors."""


class SpineDataError(SpineError):
    """A table, DICOM file or dataset folder is malformed; the message names the file at fault."""


class SpineModelError(SpineError):
    """A model config, checkpoint or pretrained weight cannot be used; the message says why."""


class SpineOutputError(SpineError):
    """An output cannot be written (a full disk, a folder another live run holds); the message names the path."""


def unknown_key(key: str, known: Iterable[str], where: str) -> SpineModelError:
    """The one error for a key no config knows: it names where, the key and the nearest known key
    (or, with none near, every known key). Recipe configs, model configs, ``pipeline.json``
    sections and ``from_pretrained`` keywords all raise it."""
    known = sorted(known)
    near = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"known keys: {known}"
    return SpineModelError(f"{where}: unknown key {key!r}; {hint}")
