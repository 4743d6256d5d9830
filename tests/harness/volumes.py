"""Stand-ins for a network volume that is read-only or full: a small tmpfs mounted on a test's folder.

Mounting needs root (CI runs as root); elsewhere the tests that need it are skipped. As root,
file permissions do not stop writes, so a chmod'd folder is no stand-in: a read-only mount is.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` mounted on ``path`` (made if missing) for the block's length."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "gams-test-volume", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # busy: detach it now


def remount_read_only(path: Path) -> None:
    """Make a tmpfs mounted by ``tmpfs`` read-only, keeping what was written to it."""
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


def fill(folder: Path) -> None:
    """Write into ``folder`` until its file system is full."""
    with open(folder / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:
            pass
