"""Outputs written whole or not at all, and output folders held by one run at a time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from spinemm.errors import SpineOutputError
from spinemm.files import LOCK_NAME, OutputLock, write_atomic, write_together

FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
from spinemm.errors import SpineOutputError
from spinemm.files import write_together
try:
    write_together({sys.argv[1]: b"n" * 5_000, sys.argv[2]: b"n" * 50_000})
except SpineOutputError as err:
    print(err)
    sys.exit(3)
"""


def test_a_full_disk_leaves_every_old_file_and_names_the_path(tmp_path):
    first, second = tmp_path / "submission.csv", tmp_path / "locations.csv"
    write_together({first: b"old submission", second: b"old locations"})
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(first), str(second)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert str(second) in proc.stdout and "too large" in proc.stdout.lower()
    # the first file was complete, but the pair is replaced together or not at all
    assert first.read_bytes() == b"old submission" and second.read_bytes() == b"old locations"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locations.csv", "submission.csv"]  # no temp left


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_atomic(path, b"{}")

    def broken(fd, mode):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", broken)
    with pytest.raises(SpineOutputError, match=f"{path}.*No space left"):
        write_atomic(path, b'{"new": 1}')
    monkeypatch.undo()
    assert path.read_bytes() == b"{}" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_an_unwritable_folder_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpineOutputError, match="cannot write .*file/out.csv"):
        write_atomic(blocker / "out.csv", b"x")  # its folder is a file


def test_a_live_run_holds_its_folder_and_a_dead_ones_lock_is_taken_over(tmp_path):
    with OutputLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(SpineOutputError, match=f"{tmp_path} is being written by another spinemm run"):
            OutputLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit

    parent = os.getppid()  # alive for as long as this test runs
    (tmp_path / LOCK_NAME).write_text(f"{parent}\n")
    with pytest.raises(SpineOutputError, match=f"pid {parent}"):
        OutputLock(tmp_path).acquire()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(dead.stdout)  # that process has exited
    (tmp_path / ".submission.csv.x1y2.tmp").write_text("half a file the dead run was writing")
    (tmp_path / "submission.csv").write_text("the last complete file")
    with OutputLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (tmp_path / LOCK_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]  # its temp cleared, its outputs kept
