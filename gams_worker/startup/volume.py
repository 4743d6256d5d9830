"""Whether a folder can take what the worker writes there, probed the way vLLM will write (a file written,
synced and removed): makedirs passes on a read-only volume, where vLLM's failure to save reads as a compile failure."""

from __future__ import annotations

import os
import shutil
from typing import Optional

PROBE_PREFIX = ".gams-worker-write-probe"


def folder_problem(path: str, min_free_bytes: int = 0) -> Optional[str]:
    """Why ``path`` cannot be written to (or lacks ``min_free_bytes``), or None; creates the folder if missing."""
    probe = os.path.join(path, f"{PROBE_PREFIX}-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, b"gams-worker write probe\n")
            os.fsync(descriptor)  # a full volume may accept the write and refuse the data here
        finally:
            os.close(descriptor)
            os.unlink(probe)
        free = shutil.disk_usage(path).free
    except OSError as exc:
        return f"{path} is not writable ({exc.strerror or exc})"
    if free < min_free_bytes:
        return f"{path} has {free // 2**20} MiB free, less than the {min_free_bytes // 2**20} MiB it needs"
    return None
