"""Output files written whole or not at all, and output folders one run holds at a time.

- :func:`write_atomic`: bytes go to a temporary file in the target's folder and replace the
  target with ``os.replace`` (atomic on POSIX and Windows): a kill mid-write leaves
  the previous file byte-identical, a reader never sees half a file.
- :func:`write_together`: several files of one result (``submission.csv`` and ``locations.csv``)
  are all written to temporary files first and only then moved into place, one rename each; a kill
  or a full disk while writing (the slow part) leaves every old file as it was.
- :class:`OutputLock`: a run takes ``.spinemm.lock`` (holding its pid) in its output folder, so a
  second live run into the same folder is refused instead of interleaving rows; a lock whose
  owner has died is taken over, and the lock is removed when the run ends.

An ``OSError`` (no space left, a read-only folder) becomes :class:`~spinemm.errors.SpineOutputError`
naming the path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from .errors import SpineOutputError

__all__ = ["write_atomic", "write_together", "OutputLock", "LOCK_NAME"]

LOCK_NAME = ".spinemm.lock"


def _temp_beside(path: Path, data: bytes) -> Path:
    """``data`` in a complete, flushed temporary file in ``path``'s folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise SpineOutputError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise SpineOutputError(f"cannot write {path}: {err.strerror or err}") from err
        raise
    return Path(tmp)


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all (module docstring); returns the path."""
    return write_together({path: data})[0]


def write_together(files: Mapping[str | os.PathLike, bytes]) -> list[Path]:
    """Write every file to a temporary name first, then move each into place (module docstring)."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            temps.append((_temp_beside(Path(path), data), Path(path)))
        for tmp, path in temps:
            try:
                os.replace(tmp, path)
            except OSError as err:
                raise SpineOutputError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
    return [Path(p) for p in files]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class OutputLock:
    """Hold ``folder`` for this process while a run writes into it (module docstring)::

        with OutputLock(out):
            write_together({...})
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._held = False

    def acquire(self) -> OutputLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SpineOutputError(f"cannot write {self.folder}: {err.strerror or err}") from err
        for _ in range(2):  # a second try after taking over a dead owner's lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if (owner is not None and _alive(owner)) or (owner is None and self._young()):
                    raise SpineOutputError(
                        f"{self.folder} is being written by another spinemm run (pid {owner}); wait for it or "
                        f"choose another output folder (delete {self.path} if that process is not spinemm)"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # its owner is gone: take it over
                for stale in self.folder.glob(".*.tmp"):  # what the dead run was writing (_temp_beside)
                    stale.unlink(missing_ok=True)
                continue
            except OSError as err:
                raise SpineOutputError(f"cannot write {self.path}: {err.strerror or err}") from err
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            self._held = True
            return self
        raise SpineOutputError(f"cannot take {self.path}: another run took it at the same moment")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):  # unreadable or half-written: nobody we can wait for
            return None

    def _young(self) -> bool:
        """A lock file made in the last seconds, whose owner may not have written its pid yet."""
        try:
            return time.time() - self.path.stat().st_mtime < 5.0
        except OSError:
            return False

    def release(self) -> None:
        if self._held and self._owner() == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
