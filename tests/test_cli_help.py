"""The command line explains itself: help and defaults for every option, --version, one-line errors,
tracebacks only with --debug, documented exit codes; the recipes' errors are one line too."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import spinemm
from spinemm import cli
from spinemm.cli import build_parser, main
from spinemm.errors import SpineModelError

ROOT = Path(__file__).resolve().parents[1]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_help_and_shows_its_default(name):
    parser = subcommands()[name]
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"spinemm {name}: {action.dest} has no help"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, f"spinemm {name}: {action.dest} hides its default"


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"spinemm {spinemm.__version__}"


def test_exit_codes_are_documented():
    text = build_parser().format_help()
    for code in ("0 done", "2 bad input", "1 an unexpected error", "130 interrupted"):
        assert code in " ".join(text.split())


def test_bad_model_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    args = ["predict", "--model", "no-such-model", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(args) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("spinemm predict: error: unknown model 'no-such-model'") and "\n" not in err
    for debug in (["--debug", *args], [*args, "--debug"]):  # before or after the command
        with pytest.raises(SpineModelError):
            main(debug)


def test_unexpected_error_is_one_line_with_exit_1(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(cli, "_cmd_evaluate", broken)
    assert main(["evaluate", "--solution", "s.csv", "--submission", "p.csv"]) == cli.EXIT_UNEXPECTED
    err = capsys.readouterr().err.strip()
    assert "RuntimeError: something inside broke" in err and "--debug" in err and "\n" not in err


def run_recipe_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "train_stages.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bad_recipe_key_is_one_line_error():
    done = run_recipe_script("--config", str(ROOT / "recipes" / "configs" / "tiny.yaml"), "trian.epochs=3")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "trian" in lines[0] and "Traceback" not in done.stderr

def test_bad_recipe_key_with_debug_raises_with_its_traceback():
    """The script's ``__main__`` is ``run_recipe(main)`` (run above as a process). With --debug the
    error propagates, so Python prints its traceback and exits 1; checked here in-process."""
    from spinemm.cli import run_recipe

    spec = importlib.util.spec_from_file_location("recipe_train_stages", ROOT / "recipes" / "train_stages.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    with pytest.raises(SpineModelError, match="trian"):
        run_recipe(recipe.main, ["trian.epochs=3", "--debug"])
    assert run_recipe(recipe.main, ["trian.epochs=3"]) == cli.EXIT_BAD_INPUT


@pytest.mark.slow
def test_python_dash_m_spinemm_is_the_cli():
    done = subprocess.run([sys.executable, "-m", "spinemm", "--version"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == f"spinemm {spinemm.__version__}", done


def test_recipe_help_lists_every_key_with_type_default_and_description(capsys):
    from spinemm.training.config import DEFAULTS, config_from_argv
    from spinemm.training.config_help import key_docs
    from spinemm.training.sections import RecipeConfig

    with pytest.raises(SystemExit) as done:
        config_from_argv(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    docs = key_docs(RecipeConfig)

    def leaves(mapping, prefix=""):
        for key, value in mapping.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    undocumented = [key for key, _ in leaves(DEFAULTS) if not docs.get(key)]
    assert not undocumented, f"config keys without a comment in their dataclass (training.sections): {undocumented}"
    for key, value in leaves(DEFAULTS):
        assert f"  {key}  (" in text and f"default {value!r})" in text, key
    assert "train.epochs  (int, default 1)\n      passes over the training studies" in text
    assert "grader.model.refine  (int, default 1)" in text  # the stage dataclass's fields too


@pytest.mark.parametrize("load, where, typo, near", [
    (lambda: spinemm.training.load_config({"train": {"epocs": 2}}), "recipe config", "train.epocs", "train.epochs"),
    (lambda: spinemm.training.load_config(None, ["grader.model.sise=3"]), "recipe config", "grader.model.sise",
     "grader.model.size"),
    (lambda: spinemm.create_model("spine-tiny", **{"fusion.layrs": 2}), "model config", "fusion.layrs",
     "fusion.layers"),
    (lambda: spinemm.load_model("spine-tiny", revison="main"), "load_model", "revison", "revision"),
])
def test_every_config_names_the_nearest_key(load, where, typo, near):
    """One strict-key error everywhere a config is read: where, the key, and the nearest known key."""
    with pytest.raises(spinemm.SpineModelError) as err:
        load()
    assert str(err.value).startswith(where) and f"unknown key {typo!r}; did you mean {near!r}?" in str(err.value)


def test_a_pipeline_json_section_names_the_nearest_key(tmp_path):
    import json

    from spinemm.models.config import LocatorConfig
    from spinemm.pipeline import LocateStage

    spinemm.SpinePipeline(spinemm.create_model("spine-tiny"), LocateStage(LocatorConfig(size=32))) \
        .save_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    meta["locate"]["sise"] = meta["locate"].pop("size")
    (tmp_path / "p" / "pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(spinemm.SpineModelError, match=r"pipeline.json: locate: unknown key 'sise'; did you mean 'size'"):
        spinemm.load_pipeline(tmp_path / "p")
