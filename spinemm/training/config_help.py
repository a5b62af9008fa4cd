"""``--help`` of a recipe: every config key with its type, default and description.

The descriptions are the comments written beside each key of :data:`~.config.DEFAULTS` (and beside
each field of the stage config dataclasses whose fields make the ``grader.model`` and
``locator.model`` sections), read from the source with ``ast`` and ``tokenize``, so the help
cannot drift from the code: a key documented in one place is documented in both.
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
from types import ModuleType
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


def key_docs(config_module: ModuleType) -> dict[str, str]:
    """Dotted key -> description, for every key of ``config_module.DEFAULTS`` that has one (the
    module is passed in, :mod:`spinemm.training.config`, which imports this one for ``--help``)."""
    source = inspect.getsource(config_module)
    comments, lines = _comments(source), source.splitlines()
    tree = ast.parse(source)
    node = next(n.value for n in tree.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "DEFAULTS")
    docs: dict[str, str] = {}

    def walk(mapping: ast.Dict, prefix: str) -> None:
        for key, value in zip(mapping.keys, mapping.values, strict=True):
            if not isinstance(key, ast.Constant):
                continue
            dotted = f"{prefix}{key.value}"
            docs[dotted] = _described(key.lineno, comments, lines)
            if isinstance(value, ast.Dict):
                walk(value, f"{dotted}.")
            elif isinstance(value, ast.Call) and getattr(value.func, "id", "") == "_fields":
                cls = getattr(config_module, value.args[0].id)
                docs.update({f"{dotted}.{k}": v for k, v in _dataclass_docs(cls).items()})

    walk(node, "")
    return docs


def _type_name(value: Any) -> str:
    return "any (null)" if value is None else "mapping" if isinstance(value, dict) else type(value).__name__


def help_text(defaults: dict[str, Any], config_module: ModuleType) -> str:
    """One entry per leaf key: ``dotted.key  (type, default value)`` and its description."""
    docs = key_docs(config_module)
    out: list[str] = []

    def walk(mapping: dict[str, Any], prefix: str) -> None:
        for key, value in mapping.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                section = docs.get(dotted, "")
                out.append(f"\n[{dotted}]" + (f"  {section}" if section else ""))
                walk(value, f"{dotted}.")
                continue
            out.append(f"  {dotted}  ({_type_name(value)}, default {value!r})")
            if docs.get(dotted):
                out.append(f"      {docs[dotted]}")

    walk(defaults, "")
    return "\n".join(out)
