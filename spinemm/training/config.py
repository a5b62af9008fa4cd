"""Recipe configs: YAML defaults + command-line overrides, resolved config saved beside the outputs.

A config is a plain nested dict. :data:`DEFAULTS` lists every key a recipe reads, so a typo in a
YAML file or on the command line fails loudly instead of being ignored (timm-style). Overrides are
dotted keys written any of three ways::

    python recipes/train_detect.py --config recipes/configs/tiny.yaml train.epochs=2 \\
        --optim.lr 1e-3 --resume=latest

Values are parsed as YAML (``1e-4``, ``true``, ``null``, ``[a, b]`` all work). Keys whose
default is an empty dict or null (``model.kwargs``, ``data.phantom``) take any value.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import SpineModelError
from ..files import write_atomic
from ..models.config import GraderConfig, LocatorConfig


def _fields(cls: type) -> dict[str, Any]:
    """A stage config dataclass's fields and defaults, as a config section (tuples as YAML lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cls()).items()}


#: Every key the recipes read, with its default. Sections: model, data, split, train, optim, lora,
#: checkpoint, log, pretrain, pipeline, grader, locator, compare; plus top-level output_dir, init_from, resume.
DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/severity",  # where the run writes its checkpoints, model/, best/ and config.yaml
    "init_from": None,  # a model dir (e.g. pretrain_clip's output/model) to start from
    "resume": None,  # null | "latest" (checked against the run's settings) | "force" | a checkpoint-STEP dir
    "model": {
        "name": "spine-tiny",  # spinemm.list_models() preset
        "kwargs": {},  # create_model(name, **kwargs) config overrides, e.g. {text.type: none}
    },
    "data": {
        "root": None,  # RSNA-layout folder (train.csv, train_images/, ...)
        "phantom": None,  # {n_studies, n_test, image_size, seed}: write a phantom to root if it is empty
        # null = the model preset's; set, they override the preset when the model is created
        "num_slices": None,
        "image_size": None,  # pixels of each resampled slice; null = the model preset's
        "channels": None,  # 2.5d | single
        "augment": False,  # random flips, shifts and intensity changes of the training studies
        "cache_dir": None,  # series cache folder (spinemm cache); null: decode the DICOM each run
        "batch_size": 4,  # studies per step and process
        "eval_batch_size": None,  # default: batch_size
        "num_workers": 0,  # DataLoader worker processes
        "max_studies": None,  # use only the first N studies (smoke runs)
    },
    "split": {
        "val_fraction": 0.2,  # study-level holdout when fold is null
        "fold": None,  # k-fold index in [0, folds)
        "folds": 5,  # number of study-level folds
        "seed": 0,  # seed of the study split
    },
    "train": {
        "seed": 0,  # seed of the model's initialisation, the sampler and augmentation
        "epochs": 1,  # passes over the training studies
        "max_steps": None,  # cap on optimizer steps (the budget of compare_backbones)
        "stop_at_step": None,  # stop after this many steps as if killed (resume tests); schedule unchanged
        "gradient_accumulation_steps": 1,  # batches summed into one optimizer step
        "mixed_precision": None,  # no | bf16 | fp16; null = the launcher's (accelerate config), else no
        "cpu": False,  # train on CPU even where a GPU is visible
        "compile": False,  # the vision tower under torch.compile(fullgraph=True), LoRA included
        "location_weight": 0.5,  # weight of the location loss beside the severity loss
        "any_severe_weight": 1.0,  # weight of the any-severe-spinal term of the official metric's loss
        "freeze_vision": False,  # ignored for towers that carry LoRA (peft freezes their base weights)
        "freeze_text": False,  # keep the text tower's weights as they are
        "eval_every_epochs": 1,  # evaluate on the validation studies this often
        "select_window": 1,  # keep the epoch whose mean score over this many evaluations (ending there) is best
    },
    "optim": {
        "lr": 3.0e-4,  # fusion, heads and every fully trained parameter
        "lr_lora": 1.0e-4,  # LoRA adapter weights
        "weight_decay": 0.05,  # AdamW's decoupled weight decay
        "betas": [0.9, 0.999],  # AdamW's moment coefficients
        "warmup_ratio": 0.1,  # of the total optimizer steps
        "max_grad_norm": 1.0,  # gradients clipped to this global norm
    },
    "lora": {  # peft LoRA on the towers (spinemm.models.add_lora); fusion and heads train fully
        "r": 0,  # adapter rank; 0: no LoRA, the towers train fully
        "alpha": 16,  # LoRA scaling numerator (scale = alpha / r)
        "dropout": 0.05,  # dropout on the adapters' input
        "targets": None,  # layers to adapt; null = auto per tower kind (README: Model details)
    },
    "checkpoint": {
        "every_steps": 50,  # write a resumable checkpoint this often (and at the end)
        "keep_last": 2,  # checkpoints kept, newest by write order (null or 0: all)
        # a new run (resume null) into an output_dir holding an earlier run's checkpoints deletes
        # them first; false refuses (resume=latest continues that run, resume=force whatever it was)
        "overwrite": False,
    },
    "log": {
        "tensorboard": True,  # TensorBoard scalars through accelerate's trackers
        "progress": True,  # tqdm progress bars
        "every_steps": 10,  # log the training loss this often
    },
    "pretrain": {  # recipes/pretrain_clip.py; other sections (data, split, train, optim, lora) are shared
        "output_dir": "runs/pretrain",  # where pretraining writes model/, best/ and its checkpoints
        "epochs": None,  # null -> train.epochs
        "lr": None,  # null -> optim.lr
        "side_mm": None,  # finding crop side in patient mm; null = the model's roi_side_mm (saved with it)
        "crop_size": None,  # pixels the crop is cut at; null = the vision tower's input size
        "shift": 0.1,  # largest random shift of a training crop, a fraction of its side
        "batch_size": 64,  # (crop, prompt) pairs per process and step
        "balanced": True,  # draw pairs in inverse proportion to their severity's frequency
        "positives": "severity",  # severity: same-severity pairs are positives | text: same prompt | pair
        # create_model overrides of a dual encoder built for pretraining alone, applied over
        # model.kwargs and in place of data's sizes: the tower the grader reads (grader.towers_from)
        # may differ from the detect model's, e.g. the demo's conv tower at 32 px; null: the run's model
        "towers": None,
    },
    "pipeline": {  # recipes/train_stages.py: the stages after detect (init_from: the detect model or a pipeline)
        "output_dir": "runs/pipeline",  # one folder per stage trained, and pipeline/ (the pipeline folder)
        "stages": ["locate", "grade"],  # which to train, in order; e.g. stages=[grade] keeps init_from's locate
    },
    "grader": {  # the grade stage: the ROI grader on crops of the original slices
        "epochs": 15,  # passes over the training findings
        "lr": 2.0e-3,  # the decoder, heads and projections (and the whole CNN grader)
        "tower_lr": 3.0e-4,  # the clip grader's pretrained towers (or their LoRA adapters); a fresh one trains at lr
        # train the clip grader's text tower; false: keep it as towers_from has it, and compute each
        # distinct finding text's features once before training instead of every step
        "train_text": True,
        # dropout of the clip grader's text tower while it trains (every BERT dropout, attention's
        # too; LoRA adapters keep lora.dropout); null: the tower's own. 0 by default: dropout's masks
        # and the attention kernel they force took 8-20 ms of a 58-77 ms grade step on a CPU, for
        # no measured quality gain (RESULTS.md)
        "text_dropout": 0.0,
        # the clip grader's encoder: a saved model folder (e.g. pretraining's model/); null: the detect model
        "towers_from": None,
        # create_model overrides for a fresh vision tower beside that text tower (the backbone
        # comparison), e.g. {vision: {type: cnn, ...}}; null: the towers_from / detect model's own
        "towers": None,
        "weight_decay": 0.01,  # AdamW's decoupled weight decay
        "batch_size": 64,  # crops per step and process
        "shift": 0.2,  # largest crop shift, a fraction of the crop side (about the localiser's error)
        "slice_jitter": 1,  # largest shift in original slices
        "eval_every_epochs": 1,  # score the pipeline on the val studies (and keep the best) this often
        # keep the evaluation ending the best run of 3 (mean score): one lucky score on a few val
        # studies does not pick a mid-schedule epoch (RESULTS.md: "Model selection")
        "select_window": 3,
        "stop_at_step": None,  # stop this stage after this many steps as if killed (resume tests)
        "model": _fields(GraderConfig),  # the grade stage's model (spinemm.models.config.GraderConfig)
    },
    "locator": {  # the locate stage: the level locator on whole sagittal slices
        "epochs": 20,  # passes over the labelled sagittal slices
        "lr": 3.0e-3,  # AdamW learning rate of the whole locator
        "weight_decay": 1.0e-4,  # AdamW's decoupled weight decay
        "batch_size": 32,  # slices per step and process
        "shift": 0.1,  # largest random shift of a training slice, a fraction of its side
        "eval_every_epochs": 1,  # score the validation slices this often
        "select_window": 1,  # keep the epoch whose mean score over this many evaluations is best
        "stop_at_step": None,  # stop this stage after this many steps as if killed (resume tests)
        "model": _fields(LocatorConfig),  # the locate stage's model (spinemm.models.config.LocatorConfig)
    },
    "compare": {  # recipes/compare_backbones.py
        "output_dir": "runs/compare",  # one folder per row, and comparison.md / .csv / .png
        # rows of the table: {name: str, overrides: {dotted.key: value}} applied over this config
        "backbones": [],
        "only": None,  # run only these names (list), e.g. [cnn, clip]
        # detect: each row trains the detect stage (train_detect); grade: each row trains the grade
        # stage of the pipeline init_from (train_stages, pipeline.stages [grade]): same located points
        "stage": "detect",
    },
}


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
            known = sorted(node) if isinstance(node, dict) else []
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {'.'.join([*parts[:i], close[0]])!r}?" if close else ""
            _fail(f"unknown config key {dotted!r} ({where}){hint}")
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
        print(help_text(defaults, sys.modules[__name__]))
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
