"""Reads the model's weight files into the OS page cache in the background during start-up.

On a host whose page cache does not hold the weights, vLLM read GaMS-9B's 18.5 GB in 14.9 s
instead of 4.3 s (H100). Those reads can happen earlier, while this process does other work:
PREFETCH_WEIGHTS says when a background thread starts reading them, chunk by chunk (a read
does not hold the GIL):
- "with-imports": as soon as the model is found, while Python imports torch and vLLM;
- "after-imports": once torch and vLLM are imported, while vLLM reads the model's config and
  starts its engine process;
- "off" (the default): vLLM reads the weights itself. On the H100 either start point lost
  (first chunk 59.8 s and 56.0 s against 53.8 s): the weights loaded sooner, but the imports,
  reading their own files from the same disk, slowed by more (MAINTAINERS.md, "Fast starts").

It stays bounded:
- it reads only the weight files vLLM loads, in the order vLLM loads them;
- it reads at most what the page cache has room for (MemAvailable, and the container's
  memory limit), less a reserve: reading more would evict what it had just read;
- it stops when vLLM starts loading the weights, and when the engine start ends, however it
  ended: it never competes with a running engine for the disk.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from gams_worker.config import WorkerConfig
from gams_worker.startup.model_files import weight_shards

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 * 2**20
# Page cache left for everything else (the Python packages being imported among it).
RESERVE_BYTES = 2 * 2**30
MEMINFO = "/proc/meminfo"
# cgroup v2, then v1: the container's memory limit and use (page cache counts against the limit).
CGROUP_MEMORY_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                       ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


class WeightPrefetch:
    """Reads ``files`` in order in a daemon thread until done, ``budget_bytes`` read, or ``stop()``."""

    def __init__(self, files: Sequence[Path], budget_bytes: int, chunk_bytes: int = CHUNK_BYTES):
        self.files = list(files)
        self.total_bytes = sum(path.stat().st_size for path in self.files)
        self.budget_bytes = budget_bytes
        self.chunk_bytes = chunk_bytes
        self.read_bytes = 0
        self.files_done = 0
        self.outcome = "not started"
        self._stop_reason: Optional[str] = None
        self._stopped = threading.Event()
        self._started_at = self._ended_at = 0.0
        self._thread = threading.Thread(target=self._run, name="weight-prefetch", daemon=True)

    def start(self) -> "WeightPrefetch":
        if self.budget_bytes <= 0:
            self.outcome = "skipped: no page cache room"
            return self
        log.info("weight prefetch: reading %d files, %.2f GB, in the background (page cache room %.2f GB)",
                 len(self.files), self.total_bytes / 1e9, self.budget_bytes / 1e9)
        self._started_at = time.monotonic()
        self.outcome = "reading"
        self._thread.start()
        return self

    def stop(self, reason: str) -> None:
        """Stop after the chunk being read (at most ``chunk_bytes``); the first reason given is kept."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stopped.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once the thread has ended (or never started)."""
        if not self._started_at:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def report(self) -> Dict[str, Any]:
        ended = self._ended_at or time.monotonic()
        seconds = max(ended - self._started_at, 1e-9) if self._started_at else 0.0
        return {
            "files": len(self.files),
            "files_read": self.files_done,
            "bytes": self.total_bytes,
            "read_bytes": self.read_bytes,
            "budget_bytes": self.budget_bytes,
            "seconds": round(seconds, 2),
            "read_gb_per_s": round(self.read_bytes / seconds / 1e9, 2) if seconds else 0.0,
            "outcome": self.outcome,
        }

    def _run(self) -> None:
        try:
            self.outcome = self._read_all()
        except OSError as exc:  # a file gone or unreadable: vLLM's load will say so, not this
            self.outcome = f"stopped by an error: {exc}"
        self._ended_at = time.monotonic()
        log.info("weight prefetch: %s; %.2f of %.2f GB in %.1f s", self.outcome, self.read_bytes / 1e9,
                 self.total_bytes / 1e9, self._ended_at - self._started_at)

    def _read_all(self) -> str:
        buffer = bytearray(self.chunk_bytes)
        for path in self.files:
            with open(path, "rb", buffering=0) as handle:
                while True:
                    if self._stopped.is_set():
                        return f"stopped: {self._stop_reason}"
                    if self.read_bytes >= self.budget_bytes:
                        return f"stopped: page cache room of {self.budget_bytes / 1e9:.2f} GB read"
                    count = handle.readinto(buffer)  # releases the GIL while the disk works
                    if not count:
                        break
                    self.read_bytes += count
            self.files_done += 1
        return f"read all {len(self.files)} weight files"


def plan_weight_prefetch(config: WorkerConfig, model_path: str) -> Optional[WeightPrefetch]:
    """The background read of the weights of the model at ``model_path``, not started yet; None when
    PREFETCH_WEIGHTS is off or the folder has no weight files."""
    if config.prefetch_weights == "off":
        log.info("weight prefetch: off (PREFETCH_WEIGHTS=off)")
        return None
    model_dir = Path(model_path)
    files = [model_dir / name for name in weight_shards(model_dir) if (model_dir / name).is_file()]
    if not files:
        log.info("weight prefetch: no weight files in %s", model_dir)
        return None
    room = page_cache_room()
    budget = (room if room is not None else 0) - RESERVE_BYTES
    if budget <= 0:
        log.info("weight prefetch: skipped, the page cache has no room (%s)",
                 "unknown" if room is None else f"{room / 1e9:.2f} GB available")
    return WeightPrefetch(sorted(files, key=_natural_order), max(budget, 0))


def page_cache_room(meminfo: str = MEMINFO,
                    cgroup_files: Sequence[Sequence[str]] = CGROUP_MEMORY_FILES) -> Optional[int]:
    """Bytes the page cache can take without evicting much: MemAvailable, and no more than the
    container's memory limit leaves. None when /proc/meminfo cannot be read."""
    try:
        available = _meminfo_bytes(meminfo, "MemAvailable")
    except (OSError, ValueError):
        return None
    room = [available]
    for limit_file, usage_file in cgroup_files:
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and int(limit_text) < 2**60:  # "max" or a huge number: no limit
            room.append(int(limit_text) - usage)
        break
    return min(room)


def _meminfo_bytes(path: str, field: str) -> int:
    with open(path) as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) * 1024  # kB
    raise ValueError(f"{field} not in {path}")


def _natural_order(path: Path) -> List[Any]:
    """model-2 before model-10, as vLLM orders the files it loads."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]
