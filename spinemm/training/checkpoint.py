"""Atomic training checkpoints on top of ``accelerator.save_state`` / ``load_state``.

A checkpoint is the folder ``output_dir/checkpoint-STEP`` holding accelerate's state (model weights
as safetensors, optimizer, scheduler, per-process RNG states, GradScaler) plus ``trainer_state.json``
(our step counter, epoch, position in the epoch, metric history). It is written to
``checkpoint-STEP.tmp`` first and renamed into place only once complete, so a kill during a save
leaves the previous checkpoint as the latest loadable one; stale ``.tmp`` folders are ignored and
swept by the next save. accelerate reads its files back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import SpineModelError

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
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


def resolve_resume(resume: str | Path | None, output_dir: str | Path) -> Path | None:
    """``None`` -> None; ``"latest"`` -> the newest checkpoint of ``output_dir`` (None if there is
    none, so a first run with ``resume=latest`` simply starts); a path -> that checkpoint."""
    if resume in (None, "", False):
        return None
    if str(resume) == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise SpineModelError(f"resume={resume}: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


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
        (tmp / STATE_FILE).write_text(json.dumps({"step": int(step), **state}, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _commit(tmp, final)
        if keep_last:
            for old in list_checkpoints(root)[:-keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: str | Path) -> dict[str, Any]:
    """Restore the accelerator state from ``path``; returns its ``trainer_state.json``."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise SpineModelError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    accelerator.load_state(str(path))
    return json.loads(state_file.read_text())
