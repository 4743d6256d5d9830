"""The model's weight files read into the page cache while this process imports torch and vLLM, so the
engine's loader finds them in memory instead of waiting on a cold disk or a network volume. Reading only:
nothing is kept in this process, and it is skipped where the files would not fit in free memory. Until the
imports are done it reads at most PACED_BYTES_PER_S, so that the imports' small reads from the same disk
are not queued behind its large ones; then at full speed."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import List, Optional

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20  # large sequential reads: what a cold disk or a network volume serves fastest
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
# Free memory the weights may take at most, so that the engine's own allocations never meet a full page cache.
MEMORY_SHARE = 0.5
# The pace while the imports run (BENCHMARKS.md, "The readahead beside the imports").
PACED_BYTES_PER_S = 0.5e9


class WeightsReadahead:
    """A thread reading ``model_dir``'s weight files from start to end; ``stop()`` ends it early."""

    def __init__(self, model_dir: str):
        self.files = weight_files(Path(model_dir))
        self.total_bytes = sum(path.stat().st_size for path in self.files)
        self.read_bytes = 0
        self.seconds: Optional[float] = None
        self._stop = threading.Event()
        self._unpaced = threading.Event()
        self._thread = threading.Thread(target=self._read_all, name="weights-readahead", daemon=True)

    def start(self) -> "WeightsReadahead":
        problem = self._skip_reason()
        if problem:
            log.info("weights readahead: skipped (%s)", problem)
            return self
        log.info("weights readahead: reading %d files, %.1f GB, into the page cache during the imports",
                 len(self.files), self.total_bytes / 1e9)
        self._thread.start()
        return self

    def imports_done(self) -> None:
        """Read the rest at full speed."""
        self._unpaced.set()

    def stop(self) -> None:
        self._stop.set()
        self._unpaced.set()  # ends a paced wait

    def report(self) -> str:
        done = "done" if self.seconds is not None else "stopped"
        return f"{done}: {self.read_bytes / 1e9:.1f} of {self.total_bytes / 1e9:.1f} GB" + (
            f" in {self.seconds:.1f} s" if self.seconds else "")

    def _skip_reason(self) -> str:
        import psutil

        if not self.files:
            return "no weight files"
        available = psutil.virtual_memory().available
        if self.total_bytes > available * MEMORY_SHARE:
            return (f"{self.total_bytes / 1e9:.1f} GB of weights, more than {MEMORY_SHARE:.0%} of the "
                    f"{available / 1e9:.1f} GB of free memory")
        return ""

    def _read_all(self) -> None:
        started = time.monotonic()
        buffer = bytearray(CHUNK_BYTES)
        try:
            for path in self.files:
                with open(path, "rb", buffering=0) as handle:
                    while not self._stop.is_set():
                        count = handle.readinto(buffer)
                        if not count:
                            break
                        self.read_bytes += count
                        ahead_s = self.read_bytes / PACED_BYTES_PER_S - (time.monotonic() - started)
                        if ahead_s > 0 and not self._unpaced.is_set():
                            self._unpaced.wait(ahead_s)
                if self._stop.is_set():
                    return
        except OSError as exc:  # the engine's loader will meet it and say so; this is only a head start
            log.warning("weights readahead: stopped by %r", exc)
            return
        self.seconds = time.monotonic() - started
        log.info("weights readahead: %s", self.report())


def weight_files(model_dir: Path) -> List[Path]:
    """The weight files vLLM would load: safetensors where there are any, else the PyTorch formats."""
    for pattern in WEIGHT_PATTERNS:
        found = sorted(model_dir.glob(pattern))
        if found:
            return found
    return []
