"""Architecture rules, checked statically on the source of ``spinemm/`` (nothing is imported).

Layers, lowest first; a module may import only from its own layer or lower ones:

    0 base      spinemm (the facade's own helpers), spinemm._lazy, constants, errors, files, text,
                tokenizer, metrics, losses
    1 data      spinemm.data.*
    2 models    spinemm.models.*
    3 pipeline  spinemm.pipeline.*
    4 apps      spinemm.training.*, spinemm.inference, spinemm.zero_shot, spinemm.viz and any
                other top-level module not named here
    5 entry     spinemm.demo, spinemm.cli, spinemm.__main__ (`python -m spinemm`)

Inside ``apps``, training and inference stay apart: nothing under ``spinemm.training`` imports
``spinemm.inference``, zero-shot scoring or the pictures and reports (``spinemm.zero_shot``,
``spinemm.viz``, ``spinemm.report``, ``spinemm.demo_report``), and ``spinemm.inference`` imports
nothing from ``spinemm.training``.

No circle anywhere: the graph of every import (an import inside a function included) has no cycle.
Third-party readers stay in their layer: ``pydicom`` is imported only under ``spinemm.data``, the
backbone libraries (``timm``, ``open_clip``) only under ``spinemm.models``.

Every ``import`` / ``from ... import`` node counts, wherever it is (module level, inside a
function, under ``if TYPE_CHECKING:``), and so does ``importlib.import_module("literal")``.
Relative imports are resolved to absolute names; ``from pkg import name`` counts as importing
``pkg.name`` when that is a module, as importing the module a package facade's ``_LAZY`` dict maps
``name`` to when it is a lazy name there, and as importing ``pkg`` otherwise. The string values of a
``_LAZY = {...}`` dict are not imports. ``spinemm/__init__.py`` is the public facade and is exempt.

A second rule: no source line switches a model's stage off by assigning None to its ``.grader``
or ``.locator`` attribute, in any form (plain, tuple, annotated or ``setattr``): read a stage's
output from the staged result instead.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spinemm"

LAYERS = ("base", "data", "models", "pipeline", "apps", "entry")
BASE_MODULES = ("spinemm._lazy", "spinemm.constants", "spinemm.errors", "spinemm.files", "spinemm.text",
                "spinemm.tokenizer", "spinemm.metrics", "spinemm.losses")
ENTRY_MODULES = ("spinemm.demo", "spinemm.cli", "spinemm.__main__")
EXEMPT = {"spinemm"}  # spinemm/__init__.py: the public facade (lazy attributes)
STAGE_ATTRS = ("grader", "locator")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> int:
    """The layer index of an absolute ``spinemm...`` module name."""
    if module == "spinemm" or any(_within(module, m) for m in BASE_MODULES):
        return 0
    if _within(module, "spinemm.data"):
        return 1
    if _within(module, "spinemm.models"):
        return 2
    if _within(module, "spinemm.pipeline"):
        return 3
    if any(_within(module, m) for m in ENTRY_MODULES):
        return 5
    return 4


#: What training never imports: inference, zero-shot scoring, pictures and reports.
TRAINING_NEVER = ("spinemm.inference", "spinemm.zero_shot", "spinemm.viz", "spinemm.marks", "spinemm.report",
                  "spinemm.demo_report")
#: Third-party packages only one part of spinemm may import: package -> the part.
THIRD_PARTY_HOME = {"pydicom": "spinemm.data", "timm": "spinemm.models", "open_clip": "spinemm.models"}


def extra_rule(importer: str, target: str) -> str | None:
    """The layer-4 rule ``importer -> target`` breaks, if any."""
    for never in TRAINING_NEVER:
        if _within(importer, "spinemm.training") and _within(target, never):
            return f"spinemm.training must not import {never}"
    if _within(importer, "spinemm.inference") and _within(target, "spinemm.training"):
        return "spinemm.inference must not import spinemm.training"
    return None


# ------------------------------------------------------------------------------------ source model


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(package: Path = PACKAGE) -> list[Path]:
    return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


def _module_path(module: str, root: Path = ROOT) -> Path | None:
    """The file defining ``module`` under ``root`` (module.py or module/__init__.py), if any."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def lazy_names(package: str, root: Path = ROOT) -> dict[str, str]:
    """``name -> module`` of a package facade's ``_LAZY = {...}`` dict (empty if it has none)."""
    path = _module_path(package, root)
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in targets) and isinstance(node.value, ast.Dict):
            return {k.value: v.value for k, v in zip(node.value.keys, node.value.values, strict=True)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
    return {}


def resolve_from(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module a ``from <level dots><module> import ...`` in ``importer`` refers to."""
    if level == 0:
        return module or ""
    parts = importer.split(".")
    if not is_package:
        parts = parts[:-1]  # a plain module's relative imports start from its package
    if level - 1 > len(parts) - 1:
        raise ValueError(f"relative import beyond the top-level package in {importer}")
    parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, *([module] if module else [])])


def resolve_name(package: str, name: str, root: Path = ROOT) -> str:
    """What ``from package import name`` imports: a submodule, a lazy name's module, or the package."""
    if name != "*" and _module_path(f"{package}.{name}", root) is not None:
        return f"{package}.{name}"
    return lazy_names(package, root).get(name, package)


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root
    line: int
    importer: str
    target: str
    statement: str

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def imports_of(path: Path, root: Path = ROOT) -> list[Import]:
    """Every spinemm import in ``path``, resolved to absolute module names."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    importer = module_name(path, root)
    is_package = path.name == "__init__.py"
    found: list[Import] = []
    seen: set[tuple[int, str]] = set()

    def add(node: ast.AST, target: str) -> None:
        if _within(target, "spinemm") and (node.lineno, target) not in seen:  # once per statement
            seen.add((node.lineno, target))
            text = (ast.get_source_segment(source, node) or lines[node.lineno - 1]).strip()
            found.append(Import(path.relative_to(root).as_posix(), node.lineno, importer, target, " ".join(text.split())))

    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = resolve_from(importer, is_package, node.level, node.module)
            for alias in node.names:
                add(node, resolve_name(base, alias.name, root))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and isinstance(node.func.value, ast.Name)
              and node.func.value.id == "importlib" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")):
            add(node, node.args[0].value)
    return found


def layer_violations(files: list[Path], root: Path = ROOT) -> list[str]:
    out = []
    for path in files:
        for imp in imports_of(path, root):
            if imp.importer in EXEMPT:
                continue
            low, high = layer_of(imp.importer), layer_of(imp.target)
            if high > low:
                out.append(f"{imp.where()}: {imp.importer} ({LAYERS[low]}) imports {imp.target} "
                           f"({LAYERS[high]}), a higher layer: `{imp.statement}`")
    return out


def apps_violations(files: list[Path], root: Path = ROOT) -> list[str]:
    out = []
    for path in files:
        for imp in imports_of(path, root):
            rule = extra_rule(imp.importer, imp.target)
            if rule and imp.importer not in EXEMPT:
                out.append(f"{imp.where()}: {imp.importer} imports {imp.target} ({rule}): `{imp.statement}`")
    return out


def import_graph(files: list[Path], root: Path = ROOT) -> dict[str, dict[str, Import]]:
    """importer -> {target: the first import statement of it}, over every spinemm import."""
    graph: dict[str, dict[str, Import]] = {}
    for path in files:
        for imp in imports_of(path, root):
            if imp.target != imp.importer:
                graph.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    return graph


def import_cycles(files: list[Path], root: Path = ROOT) -> list[list[Import]]:
    """Each circle of imports (a strongly connected set of modules, Tarjan's algorithm), as the
    import statements that close it; the facade ``spinemm/__init__.py`` is exempt (it is lazy)."""
    graph = {k: {t: i for t, i in v.items() if t not in EXEMPT} for k, v in import_graph(files, root).items()
             if k not in EXEMPT}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[Import]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:  # iterative depth-first search: no recursion limit on a deep package
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, {})))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.add(member)
                    if member == node:
                        break
                if len(members) > 1:
                    found.append([imp for m in sorted(members) for t, imp in sorted(graph.get(m, {}).items())
                                  if t in members])
    return found


def third_party_violations(files: list[Path], root: Path = ROOT) -> list[str]:
    """Imports of :data:`THIRD_PARTY_HOME` packages outside their home part of spinemm."""
    out = []
    for path in files:
        importer = module_name(path, root)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                home = THIRD_PARTY_HOME.get(name.split(".")[0])
                if home and not _within(importer, home):
                    out.append(f"{path.relative_to(root).as_posix()}:{node.lineno}: {importer} imports {name}, "
                               f"which only {home} may import")
    return out


def name_literals(files: list[Path], names: set[str], root: Path = ROOT) -> list[str]:
    """String literals in ``files`` that spell one of ``names`` exactly (docstrings and f-string
    parts are longer text, so they never match)."""
    out = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                out.append(f"{path.relative_to(root).as_posix()}:{node.lineno}: {node.value!r}")
    return out


# ----------------------------------------------------------------------- stages set to None

_STAGE_NONE_LINE = re.compile(r"\.(?:" + "|".join(STAGE_ATTRS) + r")\s*=\s*None\b")


def _pairs(target: ast.expr, value: ast.expr):
    """(target, value) leaves of ``target = value``, unpacking tuples/lists of equal length."""
    if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)) \
            and len(target.elts) == len(value.elts):
        for t, v in zip(target.elts, value.elts, strict=True):
            yield from _pairs(t, v)
    else:
        yield target, value


def _is_none(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def stage_none_assignments(path: Path) -> list[tuple[int, str, str]]:
    """(line, attributes, source line) for each line setting ``<x>.grader/.locator`` to None in ``path``."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    hits: dict[int, list[str]] = {}

    def hit(line: int, attr: str) -> None:
        if attr not in hits.setdefault(line, []):
            hits[line].append(attr)

    for node in ast.walk(ast.parse(source, filename=str(path))):
        pairs = []
        if isinstance(node, ast.Assign):
            pairs = [p for t in node.targets for p in _pairs(t, node.value)]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            pairs = [(node.target, node.value)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
              and len(node.args) == 3 and isinstance(node.args[1], ast.Constant)
              and node.args[1].value in STAGE_ATTRS and _is_none(node.args[2])):
            hit(node.lineno, node.args[1].value)
        for target, value in pairs:
            if isinstance(target, ast.Attribute) and target.attr in STAGE_ATTRS and _is_none(value):
                hit(target.lineno, target.attr)
    for number, text in enumerate(lines, start=1):  # the plain one-line form, even where ast misses it
        for match in _STAGE_NONE_LINE.finditer(text.split("#", 1)[0]):
            hit(number, match.group(0).split("=")[0].strip(" ."))
    return [(n, ", ".join(f".{a}" for a in attrs), lines[n - 1].strip()) for n, attrs in sorted(hits.items())]


# ------------------------------------------------------------------------------------------- tests

FILES = source_files()


def test_the_scan_sees_the_package():
    names = {module_name(p) for p in FILES}
    assert {"spinemm", "spinemm.errors", "spinemm.data.dicom", "spinemm.models.factory", "spinemm.cli"} <= names
    assert sum(len(imports_of(p)) for p in FILES) > 50  # the resolver finds real imports, not nothing


def test_imports_follow_the_layers():
    violations = layer_violations(FILES)
    assert not violations, f"{len(violations)} import(s) point up the layers:\n" + "\n".join(violations)


def test_training_and_inference_stay_apart():
    violations = apps_violations(FILES)
    assert not violations, f"{len(violations)} training <-> inference import(s):\n" + "\n".join(violations)


def test_no_import_circles():
    cycles = import_cycles(FILES)
    assert not cycles, f"{len(cycles)} import circle(s):\n" + "\n\n".join(
        "\n".join(f"{imp.where()}: {imp.importer} -> {imp.target}: `{imp.statement}`" for imp in cycle)
        for cycle in cycles)


def test_third_party_readers_stay_in_their_layer():
    violations = third_party_violations(FILES)
    assert not violations, "\n".join(violations)


def test_condition_and_level_names_come_from_constants():
    from spinemm import constants

    names = {*constants.CONDITIONS, *constants.CONDITION_NAMES, *constants.LEVELS, *constants.LEVEL_NAMES,
             *constants.LABEL_COLUMNS}
    found = name_literals([p for p in FILES if p.name != "constants.py" or p.parent != PACKAGE], names)
    assert not found, "spell condition and level names through spinemm.constants:\n" + "\n".join(found)


def test_no_stage_is_switched_off_by_assigning_none():
    found = [f"{p.relative_to(ROOT)}:{n}: sets {attrs} to None: `{text}`"
             for p in FILES for n, attrs, text in stage_none_assignments(p)]
    assert not found, (f"{len(found)} assignment(s) of None to a model stage (pass the stages to use "
                       "explicitly instead):\n" + "\n".join(found))


# ----------------------------------------------------------------------------- the checker itself


def test_layer_table():
    assert [layer_of(m) for m in ("spinemm", "spinemm.errors", "spinemm.metrics", "spinemm.data.tables",
                                  "spinemm.models.unet3d", "spinemm.pipeline", "spinemm.pipeline.stages",
                                  "spinemm.inference", "spinemm.training.loop", "spinemm.zero_shot",
                                  "spinemm.some_new_module", "spinemm.demo", "spinemm.cli")] == \
        [0, 0, 0, 1, 2, 3, 3, 4, 4, 4, 4, 5, 5]
    assert layer_of("spinemm.textual") == 4  # a prefix of a name is not the module
    assert extra_rule("spinemm.training.grader", "spinemm.inference") is not None
    assert extra_rule("spinemm.inference", "spinemm.training.common") is not None
    assert extra_rule("spinemm.inference", "spinemm.models.factory") is None
    assert extra_rule("spinemm.demo", "spinemm.training") is None


def test_relative_imports_resolve():
    assert resolve_from("spinemm.models.unet3d", False, 1, "encoders") == "spinemm.models.encoders"
    assert resolve_from("spinemm.models.unet3d", False, 2, "errors") == "spinemm.errors"
    assert resolve_from("spinemm.models", True, 1, "base") == "spinemm.models.base"
    assert resolve_from("spinemm.models", True, 2, "_lazy") == "spinemm._lazy"
    assert resolve_from("spinemm.training.grader", False, 2, None) == "spinemm"
    assert resolve_from("spinemm.cli", False, 0, "spinemm.data") == "spinemm.data"


def _write(root: Path, files: dict[str, str]) -> list[Path]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return sorted(root.rglob("*.py"))


def test_checker_flags_upward_and_lazy_imports_and_skips_strings(tmp_path):
    lazy_names.cache_clear()
    files = _write(tmp_path, {
        "spinemm/__init__.py": "from .models import factory\n",  # the exempt facade
        "spinemm/errors.py": "",
        "spinemm/data/__init__.py": "from .._lazy import lazy_getattr\n_LAZY = {'x': 'spinemm.inference'}\n",
        "spinemm/data/tables.py": "def f():\n    from ..models import factory\n",  # up, inside a function
        "spinemm/models/__init__.py": "_LAZY = {'create_model': 'spinemm.models.factory'}\n",
        "spinemm/models/factory.py": "from ..errors import E\nfrom . import base\n",
        "spinemm/models/base.py": "from spinemm.data import tables\n",
        "spinemm/inference.py": "import importlib\nimportlib.import_module('spinemm.training.loop')\n",
        "spinemm/training/__init__.py": "",
        "spinemm/training/loop.py": "from spinemm.models import create_model\nfrom .. import inference\n",
        "spinemm/cli.py": "from .inference import predict\n",
    })
    try:
        layers = layer_violations(files, tmp_path)
        apps = apps_violations(files, tmp_path)
    finally:
        lazy_names.cache_clear()
    assert layers == [
        "spinemm/data/tables.py:2: spinemm.data.tables (data) imports spinemm.models.factory (models), "
        "a higher layer: `from ..models import factory`"]
    assert apps == [
        "spinemm/inference.py:2: spinemm.inference imports spinemm.training.loop (spinemm.inference must not "
        "import spinemm.training): `importlib.import_module('spinemm.training.loop')`",
        "spinemm/training/loop.py:2: spinemm.training.loop imports spinemm.inference (spinemm.training must not "
        "import spinemm.inference): `from .. import inference`"]
    loop = imports_of(tmp_path / "spinemm/training/loop.py", tmp_path)
    assert loop[0].target == "spinemm.models.factory"  # a lazy name resolves to its module


def test_checker_finds_circles_and_stray_readers(tmp_path):
    lazy_names.cache_clear()
    files = _write(tmp_path, {
        "spinemm/__init__.py": "from .models import a\n",  # the exempt facade closes no circle
        "spinemm/models/__init__.py": "",
        "spinemm/models/a.py": "import timm\nfrom .b import f\n",
        "spinemm/models/b.py": "def f():\n    from .c import g  # inside a function: still an import\n",
        "spinemm/models/c.py": "from . import a\nimport spinemm\n",
        "spinemm/models/d.py": "from .a import x\n",  # imports into the circle, not part of it
        "spinemm/zero_shot.py": "import pydicom\nfrom .training import loop\n",
        "spinemm/training/__init__.py": "",
        "spinemm/training/loop.py": "from ..viz import chart\nfrom ..data import tables\n",
        "spinemm/viz.py": "",
        "spinemm/data/__init__.py": "",
        "spinemm/data/tables.py": "import pydicom.uid\n",
    })
    try:
        cycles = import_cycles(files, tmp_path)
        apps = apps_violations(files, tmp_path)
        readers = third_party_violations(files, tmp_path)
    finally:
        lazy_names.cache_clear()
    assert [[(i.importer, i.target, i.line) for i in cycle] for cycle in cycles] == [[
        ("spinemm.models.a", "spinemm.models.b", 2), ("spinemm.models.b", "spinemm.models.c", 2),
        ("spinemm.models.c", "spinemm.models.a", 1)]]
    assert apps == ["spinemm/training/loop.py:1: spinemm.training.loop imports spinemm.viz (spinemm.training must "
                    "not import spinemm.viz): `from ..viz import chart`"]
    assert readers == ["spinemm/zero_shot.py:1: spinemm.zero_shot imports pydicom, which only spinemm.data may import"]
    # and the real package: its import graph is big enough for the check to mean something
    assert sum(len(v) for v in import_graph(FILES).values()) > 100


def test_stage_none_forms(tmp_path):
    path = tmp_path / "m.py"
    # The forms the rule must catch, written with a placeholder so that a plain grep of the
    # repository for stage-None assignments finds none in this file either.
    path.write_text(
        "model.grader = NIL\n"
        "(model.locator, model.grader) = (NIL, NIL)\n"
        "saved, (model.locator, model.grader) = (model.locator, model.grader), (NIL, NIL)\n"
        "model.locator, other = NIL, 1\n"
        "setattr(model, 'grader', NIL)\n"
        "model.grader = grader  # fine\n"
        "ok = model.grader == NIL\n"
        "model.locator, model.grader = stages\n"
        "model.grader: object = NIL\n".replace("NIL", "None")
    )
    assert [(n, attr) for n, attr, _ in stage_none_assignments(path)] == [
        (1, ".grader"), (2, ".locator, .grader"), (3, ".locator, .grader"), (4, ".locator"), (5, ".grader"),
        (9, ".grader")]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
