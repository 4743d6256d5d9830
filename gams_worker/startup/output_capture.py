"""Capture of the engine's output while it starts, at the file-descriptor level: vLLM's engine core is a
child process that prints the root cause of a failed start to the inherited fds 1 and 2."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

CAPTURE_LIMIT_BYTES = 256 * 1024  # the last bytes, where the root cause is; a whole GPU start's log fits


class OutputCapture:
    """While active, tees what this process and its children write to fds 1 and 2 into a buffer; children
    started meanwhile write into the pipe after ``stop()`` too, still forwarded and buffered."""

    def __init__(self, limit_bytes: int = CAPTURE_LIMIT_BYTES, fds: Sequence[int] = (1, 2),
                 on_line: Optional[Callable[[str, float], None]] = None):
        self._limit = limit_bytes
        self._fds = tuple(fds)
        self._on_line = on_line  # called with each whole line and its arrival time (epoch seconds)
        self.watcher_error: Optional[Exception] = None  # the first exception on_line raised
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self._last_data = time.monotonic()
        self._saved: List[Tuple[int, int]] = []  # (fd, duplicate of its original target)

    def start(self) -> "OutputCapture":
        _flush_python_streams()
        for fd in self._fds:
            original = os.dup(fd)
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            self._saved.append((fd, original))
            threading.Thread(target=self._pump, args=(read_end, original), name=f"output-tee-{fd}",
                             daemon=True).start()
        return self

    def stop(self) -> None:
        _flush_python_streams()
        for fd, original in self._saved:
            os.dup2(original, fd)
        self._saved = []

    def __enter__(self) -> "OutputCapture":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def text(self, settle_s: float = 0.3, max_wait_s: float = 5.0) -> str:
        """The buffered output, once no new bytes have come for ``settle_s`` (at most ``max_wait_s``)."""
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() < deadline and time.monotonic() - self._last_data < settle_s:
            time.sleep(0.05)
        with self._lock:
            return self._buffer.decode("utf-8", errors="replace")

    def _pump(self, read_end: int, original: int) -> None:
        forward = True
        partial = b""  # the start of a line whose end has not come yet
        try:
            while True:
                data = os.read(read_end, 65536)
                if not data:
                    break
                if forward:
                    try:
                        os.write(original, data)
                    except OSError:  # the original reader went away; keep buffering
                        forward = False
                with self._lock:
                    self._buffer += data
                    if len(self._buffer) > self._limit:
                        del self._buffer[: len(self._buffer) - self._limit]
                    self._last_data = time.monotonic()
                if self._on_line is not None:
                    partial = self._hand_out_lines(partial + data)
        finally:
            os.close(read_end)
            os.close(original)

    def _hand_out_lines(self, data: bytes) -> bytes:
        """Give each whole line to ``on_line``; return the unfinished rest."""
        *lines, rest = data.split(b"\n")
        arrived = time.time()
        for line in lines:
            try:
                self._on_line(line.decode("utf-8", errors="replace"), arrived)
            except Exception as exc:  # a watcher's bug must not stop the tee (nor be logged from
                self.watcher_error = self.watcher_error or exc  # here, into the pipe being drained)
        return rest[-self._limit:]


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
