"""Recipe configs: YAML defaults + command-line overrides, resolved config saved beside the outputs.

A config is a plain nested dict. :data:`DEFAULTS` lists every key a recipe reads (derived from
the dataclasses of :mod:`.sections`), so a typo in a YAML file or on the command line fails loudly
instead of being ignored (timm-style), with the nearest key named. Overrides are
dotted keys written any of three ways::

    python recipes/train_detect.py --config recipes/configs/tiny.yaml train.epochs=2 \\
        --optim.lr 1e-3 --resume=latest

Values are parsed as YAML (``1e-4``, ``true``, ``null``, ``[a, b]`` all work). Keys whose
default is an empty dict or null (``model.kwargs``, ``data.phantom``) take any value.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import SpineModelError, unknown_key
from ..files import write_atomic
from .sections import RecipeConfig, defaults_of

#: Every key the recipes read, with its default: derived from :class:`~.sections.RecipeConfig`
#: (one dataclass per section; the comment beside each field is its ``--help`` text).
DEFAULTS: dict[str, Any] = defaults_of(RecipeConfig)


def _fail(msg: str) -> None:
    raise SpineModelError(msg)


_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_value(text: str) -> Any:
    """A command-line value as YAML; ``1e-4`` (which YAML 1.1 reads as a string) becomes a float."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpineModelError(f"cannot parse override value {text!r}: {err}") from None
    if isinstance(value, str) and _EXPONENT.match(value.strip()):
        return float(value)
    return value


def _is_free(node: Any) -> bool:
    return node is None or (isinstance(node, dict) and not node)


def _free_form(defaults: dict[str, Any], path: list[str]) -> bool:
    """True when ``path`` is, or lies inside, a key whose default is ``{}`` or null: any value goes."""
    node: Any = defaults
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
        if _is_free(node):
            return True
    return False


def _check_key(defaults: dict[str, Any], dotted: str, where: str) -> None:
    node: Any = defaults
    parts = dotted.split(".")
    for i, key in enumerate(parts):
        if not isinstance(node, dict) or key not in node:
            known = [".".join([*parts[:i], k]) for k in node] if isinstance(node, dict) else []
            raise unknown_key(dotted, known, f"recipe config ({where})")
        node = node[key]
        if _is_free(node):
            return  # the rest of the path is inside a free-form key


def _coerce(default: Any, value: Any, dotted: str) -> Any:
    """Keep YAML's type, checked against the default's: ints where the default is a float
    (``lr=1`` means 1.0), a whole float where it is an int (``1e3``); anything else of the wrong
    type is a SpineModelError naming the key (``train.epochs=abc``)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is None and not isinstance(default, bool):
        return None  # null: unset, the key's documented fallback
    if isinstance(default, bool):
        if not isinstance(value, bool):
            _fail(f"config key {dotted!r} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not (number and isinstance(value, int)):
            _fail(f"config key {dotted!r} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if not number:
            _fail(f"config key {dotted!r} must be a number, got {value!r}")
        return float(value)
    elif isinstance(default, str) and not isinstance(value, str):
        _fail(f"config key {dotted!r} must be a string, got {value!r}")
    return value


def set_dotted(config: dict[str, Any], dotted: str, value: Any, defaults: dict[str, Any] = DEFAULTS,
               where: str = "command line") -> None:
    """Set ``config["a"]["b"] = value`` for ``dotted="a.b"``, validating the key against ``defaults``."""
    _check_key(defaults, dotted, where)
    parts = dotted.split(".")
    node, ref = config, defaults
    for key in parts[:-1]:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        ref = ref.get(key, {}) if isinstance(ref, dict) else {}
        if not isinstance(node, dict):
            _fail(f"config key {dotted!r} ({where}): {key!r} is not a section")
    default = ref.get(parts[-1]) if isinstance(ref, dict) else None
    node[parts[-1]] = _coerce(default, value, dotted)


def _merge(config: dict[str, Any], update: dict[str, Any], defaults: dict[str, Any], where: str,
           prefix: str = "") -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not _free_form(defaults, dotted.split(".")):
            _check_key(defaults, dotted, where)
            _merge(config, value, defaults, where, prefix=f"{dotted}.")
        else:
            set_dotted(config, dotted, copy.deepcopy(value), defaults, where)


def parse_overrides(args: Sequence[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "--c.d", "x", "--e=2"]`` -> ``[("a.b", 1), ("c.d", "x"), ("e", 2)]``."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, text = body.split("=", 1)
            else:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    _fail(f"override {arg!r} needs a value: '{arg} VALUE' or '{arg}=VALUE'")
                key, text = body, args[i + 1]
                i += 1
        elif "=" in arg:
            key, text = arg.split("=", 1)
        else:
            _fail(f"cannot read argument {arg!r}: expected key=value, --key value or --key=value")
        key = key.replace("-", "_")  # --output-dir == output_dir; no config key has a dash
        if not key:
            _fail(f"empty key in override {arg!r}")
        out.append((key, parse_value(text)))
        i += 1
    return out


def load_config(path: str | Path | dict[str, Any] | None = None,
                overrides: Iterable[str] | Sequence[tuple[str, Any]] = (),
                defaults: dict[str, Any] = DEFAULTS) -> dict[str, Any]:
    """Defaults, then ``path`` (a YAML file or a partial config dict), then ``overrides``
    (strings as on the command line, or (dotted key, value) pairs). Unknown keys raise
    :class:`~spinemm.errors.SpineModelError`."""
    config = copy.deepcopy(defaults)
    if isinstance(path, dict):
        _merge(config, path, defaults, where="config dict")
    elif path is not None:
        path = Path(path)
        if not path.is_file():
            _fail(f"config file {path} does not exist")
        with path.open() as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            _fail(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
        _merge(config, loaded, defaults, where=str(path))
    items = list(overrides)
    pairs = parse_overrides(items) if items and isinstance(items[0], str) else items
    for key, value in pairs:
        if isinstance(value, dict) and not _free_form(defaults, key.split(".")):
            _merge(config, value, defaults, "command line", prefix=f"{key}.")
        else:
            set_dotted(config, key, value, defaults)
    given = {f"{key}.{sub}" for key, value in pairs if isinstance(value, dict) for sub in value}
    given |= {key for key, value in pairs if not isinstance(value, dict)}
    if "data" in config and "data.root" in given and not any(k.startswith("data.phantom") for k in given):
        # a phantom is written only into the root it was asked for beside: data.root given on its
        # own (a real data folder, or a typo of one) never turns into a synthetic dataset
        config["data"]["phantom"] = None
    return config


def config_from_argv(argv: Sequence[str] | None = None, defaults: dict[str, Any] = DEFAULTS) -> dict[str, Any]:
    """What a recipe's ``main(argv)`` calls: ``--config FILE`` (optional) plus overrides."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        from .config_help import help_text

        print(__doc__)
        print("Every key, with its type, default and what it does:")
        print(help_text(defaults, RecipeConfig))
        raise SystemExit(0)
    path = None
    rest: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--config":
            if i + 1 >= len(args):
                _fail("--config needs a file path")
            path, i = args[i + 1], i + 2
        elif args[i].startswith("--config="):
            path, i = args[i].split("=", 1)[1], i + 1
        else:
            rest.append(args[i])
            i += 1
    return load_config(path, rest, defaults)


def save_config(config: dict[str, Any], path: str | Path) -> Path:
    """Write the resolved config as YAML (re-loadable with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, yaml.safe_dump(config, sort_keys=False).encode())


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; non-scalars become strings (TensorBoard hparams)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out
