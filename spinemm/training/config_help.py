"""``--help`` of a recipe: every config key with its type, default and description.

The descriptions are the comments written beside each field of the config dataclasses
(:class:`~.sections.RecipeConfig`, its sections, and the stage model dataclasses nested in
``grader.model`` and ``locator.model``), read from the source with ``ast`` and ``tokenize``, so
the help cannot drift from the code: a key documented in one place is documented everywhere.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
import typing
from typing import Any


def _comments(source: str) -> dict[int, str]:
    """Line number -> the comment text on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _described(line: int, comments: dict[int, str], lines: list[str]) -> str:
    """The comment on ``line``, else the block of comment lines right above it."""
    if line in comments and not lines[line - 1].lstrip().startswith("#"):
        return comments[line]
    above, k = [], line - 1
    while k in comments and lines[k - 1].lstrip().startswith("#"):
        above.insert(0, comments[k])
        k -= 1
    return " ".join(above)


def _dataclass_docs(cls: type) -> dict[str, str]:
    source = inspect.getsource(cls)
    comments, lines = _comments(source), source.splitlines()
    return {node.target.id: _described(node.lineno, comments, lines)
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


def key_types(config_class: type, prefix: str = "") -> dict[str, str]:
    """Dotted key -> its declared type, as written (``int | None``), through nested dataclasses."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(key_types(hint, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = str(f.type if isinstance(f.type, str) else getattr(hint, "__name__", hint))
    return out


def key_docs(config_class: type, prefix: str = "") -> dict[str, str]:
    """Dotted key -> description, for every field of the config dataclass ``config_class`` and of
    the dataclasses nested in it (a section's own description is the comment on its field)."""
    docs: dict[str, str] = {}
    own = _dataclass_docs(config_class)
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        dotted = f"{prefix}{f.name}"
        docs[dotted] = own.get(f.name, "")
        if dataclasses.is_dataclass(hints[f.name]):
            docs.update(key_docs(hints[f.name], f"{dotted}."))
    return docs


def _type_name(value: Any) -> str:
    return "any (null)" if value is None else "mapping" if isinstance(value, dict) else type(value).__name__


def help_text(defaults: dict[str, Any], config_class: type) -> str:
    """One entry per leaf key of ``defaults``: ``dotted.key  (type, default value)`` and its
    description from ``config_class`` (:class:`~.sections.RecipeConfig`)."""
    docs, types = key_docs(config_class), key_types(config_class)
    out: list[str] = []

    def walk(mapping: dict[str, Any], prefix: str) -> None:
        for key, value in mapping.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                section = docs.get(dotted, "")
                out.append(f"\n[{dotted}]" + (f"  {section}" if section else ""))
                walk(value, f"{dotted}.")
                continue
            out.append(f"  {dotted}  ({types.get(dotted) or _type_name(value)}, default {value!r})")
            if docs.get(dotted):
                out.append(f"      {docs[dotted]}")

    walk(defaults, "")
    return "\n".join(out)
