"""ENGINE_START_TIMEOUT_S over the whole engine start: one critical line, its processes killed, exit 1."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable

from gams_worker.processes import end_process, engine_pids, kill_processes

log = logging.getLogger(__name__)

START_KILL_GRACE_S = 15.0  # for the start to end by itself once its processes were killed


class StartDeadline:
    """The deadline over every attempt of the fallback ladder (``timeout_s`` 0: none). On expiry the
    engine processes started since are killed, which ends vLLM's wait for them, and the ladder raises
    EngineStartError (``expired``); a start still not ended ``grace_s`` later ends the process."""

    def __init__(self, timeout_s: float, grace_s: float = START_KILL_GRACE_S,
                 kill: Callable[[Iterable[int]], Any] = kill_processes,
                 exit_process: Callable[[int], None] = end_process):
        self.timeout_s = timeout_s
        self.expired = False
        self._grace_s = grace_s
        self._kill = kill
        self._exit = exit_process
        self._engine_before = engine_pids()
        self._done = threading.Event()
        if timeout_s:
            threading.Thread(target=self._watch, name="engine-start-deadline", daemon=True).start()

    def done(self) -> None:  # the start ended (started, failed or stopped)
        self._done.set()

    def message(self, mode: str) -> str:
        return (f"engine start did not finish within ENGINE_START_TIMEOUT_S={self.timeout_s:g} s "
                f"(in {mode} mode); its processes were killed")

    def _watch(self) -> None:
        if self._done.wait(self.timeout_s):
            return
        self.expired = True
        log.critical("engine start: not finished after ENGINE_START_TIMEOUT_S=%g s; killing the engine's processes",
                     self.timeout_s)
        self._kill(engine_pids() - self._engine_before)
        if self._done.wait(self._grace_s):
            return
        log.critical("engine start: still not ended %g s after its processes were killed; exiting with status 1",
                     self._grace_s)
        self._kill(engine_pids() - self._engine_before)  # any started since
        self._exit(1)
