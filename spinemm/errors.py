"""Exceptions raised by spinemm. All are ValueErrors so callers can catch bad input broadly."""

from __future__ import annotations


class SpineError(ValueError):
    """Base class of spinemm's errors."""


class SpineDataError(SpineError):
    """A table, DICOM file or dataset folder is malformed; the message names the file at fault."""


class SpineModelError(SpineError):
    """A model config, checkpoint or pretrained weight cannot be used; the message says why."""


class SpineOutputError(SpineError):
    """An output cannot be written (a full disk, a folder another live run holds); the message names the path."""
