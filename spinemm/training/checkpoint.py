"""Atomic training checkpoints on top of ``accelerator.save_state`` / ``load_state``.

A checkpoint is the folder ``output_dir/checkpoint-STEP`` holding accelerate's state (model weights
as safetensors, optimizer, scheduler, per-process RNG states, GradScaler) plus ``trainer_state.json``
(our step counter, epoch, position in the epoch, metric history). It is written to
``checkpoint-STEP.tmp`` first and renamed into place only once complete, so a kill during a save
leaves the previous checkpoint as the latest loadable one; stale ``.tmp`` folders are ignored and
swept by the next save. accelerate reads its files back with ``torch.load(weights_only=True)``.

Resuming restores everything or fails: a file that cannot be read (a pickle that is refused, a
truncated or missing file) raises :class:`~spinemm.errors.SpineModelError` naming it, and the RNG
states, which accelerate skips with only a log line when they do not load, are restored here again
with errors raised, because a resumed run that draws other random numbers no longer repeats the
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import SpineModelError

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
FILES_KEY = "checkpoint_files"  # in trainer_state.json: the files the save wrote beside it
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


#: Keys that may change between a run and its resume: where things are kept and how fast they
#: run, not what is trained (and the stop_at_step of any section, which tests a kill).
OPERATIONAL = ("data.cache_dir", "data.num_workers", "data.eval_batch_size", "data.phantom", "train.compile")
#: The config sections that decide what a fit trains; a stage adds its own section.
RUN_SECTIONS = ("init_from", "model", "data", "split", "train", "optim", "lora")


def run_settings(config: dict[str, Any], sections: tuple[str, ...] = ()) -> dict[str, str]:
    """The settings a checkpoint records and a resume must match: ``RUN_SECTIONS`` plus
    ``sections``, flattened to dotted keys (values as text), without :data:`OPERATIONAL` keys."""
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for sub, item in value.items():
                walk(item, f"{key}.{sub}")
        elif not (key in OPERATIONAL or any(key.startswith(o + ".") for o in OPERATIONAL)
                  or key.endswith(".stop_at_step")):
            out[key] = json.dumps(value, sort_keys=True, default=str)

    for section in (*RUN_SECTIONS, *sections):
        if section in config:
            walk(config[section], section)
    return out


def resolve_resume(resume: str | Path | None, output_dir: str | Path, settings: dict[str, str] | None = None,
                   overwrite: bool = False, say: Any = print) -> Path | None:
    """The checkpoint a run starts from, or None for a fresh start.

    - ``None``: a fresh run; a folder already holding checkpoints (another run's) is refused,
      unless ``overwrite``, which deletes them first (so no old checkpoint outlives the new run);
    - ``"latest"``: the newest checkpoint of ``output_dir``, refused (naming the keys) when it was
      written with other ``settings`` (:func:`run_settings`); no checkpoint: a fresh start, said;
    - ``"force"``: the newest checkpoint whatever its settings;
    - a path: that checkpoint, checked like ``"latest"``."""
    output_dir = Path(output_dir)
    if resume in (None, "", False):
        found = list_checkpoints(output_dir)
        if found and not overwrite:
            raise SpineModelError(f"{output_dir} holds checkpoints of an earlier run ({found[-1].name}): "
                                  f"resume=latest continues it, checkpoint.overwrite=true replaces it, or "
                                  f"choose another output_dir")
        for old in found:
            shutil.rmtree(old, ignore_errors=True)
        return None
    if str(resume) in ("latest", "force"):
        path = latest_checkpoint(output_dir)
        if path is None:
            say(f"resume={resume}: no checkpoint in {output_dir}; starting a new run")
            return None
    else:
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise SpineModelError(f"resume={resume}: {path} is not a complete checkpoint (no {STATE_FILE})")
    if str(resume) != "force" and settings is not None:
        _check_same_run(path, settings)
    return path


def _check_same_run(path: Path, settings: dict[str, str]) -> None:
    try:
        recorded = json.loads((path / STATE_FILE).read_text()).get("run_settings")
    except (OSError, ValueError, AttributeError):
        return  # an unreadable state file is named by load_checkpoint
    if not isinstance(recorded, dict):
        return  # written before checkpoints recorded their settings
    changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
    if changed:
        shown = ", ".join(f"{k} {recorded.get(k, '(unset)')} -> {settings.get(k, '(unset)')}" for k in changed[:4])
        raise SpineModelError(f"{path} was written by a run with other settings ({shown}"
                              f"{f' and {len(changed) - 4} more' if len(changed) > 4 else ''}): resume=force "
                              f"resumes it anyway; a new run needs another output_dir or checkpoint.overwrite=true")


def _commit(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` folder into place (the step a kill must not split)."""
    if final.exists():  # re-saving a step (e.g. the last step after a resume): swap, then drop old
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, state: dict[str, Any],
                    keep_last: int | None = 2) -> Path:
    """Save the accelerator state and ``state`` (JSON-able) as ``checkpoint-{step}``, atomically.

    Every process must call this (each writes its own RNG state). Keeps the ``keep_last`` newest
    checkpoints (None or 0 keeps all).
    """
    root = Path(output_dir)
    final = root / f"{PREFIX}{step}"
    tmp = root / f"{PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        for stale in root.glob(f"{PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        # The file list lets a resume name a file that has gone missing since (accelerate would
        # otherwise look for another format's file, or skip the RNG states).
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / STATE_FILE).write_text(json.dumps({"step": int(step), **state, FILES_KEY: files}, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _commit(tmp, final)
        if keep_last:  # the newest by write order, never an older run's higher-numbered ones
            by_write = sorted(list_checkpoints(root), key=lambda p: (p / STATE_FILE).stat().st_mtime_ns)
            for old in by_write[:-keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: str | Path) -> dict[str, Any]:
    """Restore the accelerator state (weights, optimizer, scheduler, sampler, scaler, RNG) from
    ``path``; returns its ``trainer_state.json``. Anything that cannot be restored raises
    SpineModelError naming the file."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise SpineModelError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpineModelError(f"{state_file}: unreadable trainer state ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise SpineModelError(f"{state_file}: expected a JSON object with an integer 'step', got {str(state)[:80]!r}")
    files = state.pop(FILES_KEY, [])  # absent in checkpoints saved before it was written
    if not isinstance(files, list):
        raise SpineModelError(f"{state_file}: {FILES_KEY!r} must be a list of file names, got {files!r}")
    missing = [name for name in files if not (path / str(name)).exists()]
    if missing:
        raise SpineModelError(f"cannot resume from {path}: {path / str(missing[0])} is missing"
                              + (f" (and {missing[1:]})" if len(missing) > 1 else ""))
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # torch, safetensors and accelerate each raise their own kinds
        raise SpineModelError(
            f"cannot resume from {path}: {_unreadable_file(path)}({type(exc).__name__}: {exc})"
        ) from exc
    _restore_rng(accelerator, path)
    return state


def _unreadable_file(path: Path) -> str:
    """``"<file> cannot be read "`` for the first file of a checkpoint that does not load on its
    own, or "" when each loads (the fault is then in how the states fit the objects)."""
    from accelerate.utils import load
    from safetensors import safe_open

    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix in (".bin", ".pkl"):
                load(file, map_location="cpu")
        except Exception:
            return f"{file} cannot be read "
    return ""


def _restore_rng(accelerator: Any, path: Path) -> None:
    """Set the Python, NumPy, torch (and CUDA) generators from this process's saved RNG states."""
    import numpy as np
    import torch
    from accelerate.utils import load
    from accelerate.utils.constants import RNG_STATE_NAME

    file = path / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    if not file.is_file():
        raise SpineModelError(f"{file} is missing: without the RNG states a resumed run would not repeat the "
                              f"uninterrupted one")
    try:
        states = load(file)
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    except Exception as exc:  # a refused pickle, a truncated file, a state of the wrong form
        raise SpineModelError(f"{file}: cannot restore the RNG states ({type(exc).__name__}: {exc})") from exc
