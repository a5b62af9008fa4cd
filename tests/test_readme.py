"""README.md stays true: its quick start runs as written, and every public spinemm name that the
README and the examples use exists and is exercised by some test."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SOURCES = [README, *(p.read_text() for p in sorted((ROOT / "examples").glob("*.py")))]
TESTS = "\n".join(p.read_text() for p in sorted((ROOT / "tests").glob("test_*.py")) if p.name != "test_readme.py")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def public_names() -> set[str]:
    """Dotted ``spinemm....`` names written in the README and the examples, and names imported
    from spinemm modules there."""
    names = set()
    for text in SOURCES:
        names.update(re.findall(r"\bspinemm(?:\.[A-Za-z_]\w*)+", text))
        for module, imported in re.findall(r"from (spinemm[\w.]*) import ([\w, ]+)", text):
            names.update(f"{module}.{name.strip()}" for name in imported.split(",") if name.strip())
    return {n for n in names if not n.endswith((".py", ".md", ".yaml"))}


def resolve(dotted: str):
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


@pytest.mark.parametrize("dotted", sorted(public_names()))
def test_public_name_exists_and_is_tested(dotted):
    try:
        resolve(dotted)
    except (AttributeError, ModuleNotFoundError) as err:
        pytest.fail(f"README/examples use {dotted}, which does not exist: {err}")
    name = dotted.split(".")[-1]
    if dotted.count(".") == 1 and importlib.util.find_spec(dotted) is not None:
        return  # a module (spinemm.data, spinemm.metrics, ...): its names are checked one by one
    assert re.search(rf"\b{re.escape(name)}\b", TESTS), f"no test uses {dotted}"


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path, monkeypatch):
    start = README.index("## Quick start")
    code = python_blocks(README[start:])[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md quick start", "exec"), namespace)
    assert namespace["outputs"]["logits"].shape == (2, 25, 3)
    assert namespace["text"].shape == (1, namespace["model"].config.embed_dim)
    assert 0 < namespace["score"] < 5 and (tmp_path / "my_model" / "README.md").is_file()
    assert os.path.isdir(tmp_path / "phantom")
