"""The engine watchdog: a dead or hung engine ends the process with one critical line and exit 1,
so that RunPod replaces the worker; the jobs in flight get their errors posted first."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable, Optional

from gams_worker.processes import end_process, kill_processes

log = logging.getLogger(__name__)

DEAD_ENGINE_GRACE_S = 1.0  # for a dead engine's jobs in flight to post their errors before the exit
HUNG_ENGINE_DEATH_WAIT_S = 10.0  # for vLLM to fail the requests in flight once a hung engine's processes are killed


def unfinished_requests(engine: Any) -> Optional[int]:
    """Requests vLLM's output processor still tracks (a plain counter, safe from any thread), or None."""
    output_processor = getattr(engine, "output_processor", None)
    return None if output_processor is None else output_processor.get_num_unfinished_requests()


class StepClock:
    """When vLLM's front end last received output from its engine core (``time.monotonic()``)."""

    def __init__(self) -> None:
        self.last_output_at = time.monotonic()

    def watch(self, engine: Any) -> None:
        """Stamp this clock at every message of ``engine``'s core, before its first request: vLLM's
        output handler calls ``output_processor.update_scheduler_stats`` once per message."""
        processor = engine.output_processor
        update_scheduler_stats = processor.update_scheduler_stats

        def stamped(*args: Any, **kwargs: Any) -> Any:
            self.last_output_at = time.monotonic()
            return update_scheduler_stats(*args, **kwargs)

        processor.update_scheduler_stats = stamped


class EngineWatchdog:
    """Exits the process with status 1 once the engine is dead (``errored``) or hung: requests in flight
    and no output (``clock``) for ``stall_timeout_s`` (0: never) since the later of the last output and
    the first request after an idle time. ``stop()`` before a clean shutdown."""

    def __init__(self, engine: Any, clock: StepClock, stall_timeout_s: float = 0,
                 engine_pids: Iterable[int] = (), interval_s: float = 0.5,
                 kill: Callable[[Iterable[int]], Any] = kill_processes,
                 exit_process: Callable[[int], None] = end_process):
        self._engine = engine
        self._clock = clock
        self._stall_timeout_s = stall_timeout_s
        self._engine_pids = tuple(engine_pids)
        self._interval_s = interval_s
        self._kill = kill
        self._exit = exit_process
        self._busy_since: Optional[float] = None
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, name="engine-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def quiet_for(self, now: float) -> Optional[float]:
        """Seconds the engine has had requests in flight without producing output; None when idle."""
        if not unfinished_requests(self._engine):
            self._busy_since = None
            return None
        if self._busy_since is None:
            self._busy_since = now
        return now - max(self._clock.last_output_at, self._busy_since)

    def _watch(self) -> None:
        while not self._stopped.wait(self._interval_s):
            if self._engine.errored:
                self._end("the vLLM engine is dead; exiting with status 1 so RunPod replaces this worker")
                return
            quiet = self.quiet_for(time.monotonic()) if self._stall_timeout_s else None
            if quiet is not None and quiet > self._stall_timeout_s:
                self._end(f"the vLLM engine is hung: no output for {quiet:.1f} s with "
                          f"{unfinished_requests(self._engine)} requests in flight (ENGINE_STALL_TIMEOUT_S="
                          f"{self._stall_timeout_s:g}); killing its processes and exiting with status 1 "
                          "so RunPod replaces this worker", hung=True)
                return

    def _end(self, line: str, hung: bool = False) -> None:
        if self._stopped.is_set():
            return
        log.critical(line)
        if hung:  # vLLM sees its engine core gone and fails the requests in flight, as for a dead engine
            self._kill(self._engine_pids)
            waited_until = time.monotonic() + HUNG_ENGINE_DEATH_WAIT_S
            while not self._engine.errored and time.monotonic() < waited_until:
                time.sleep(0.1)
        time.sleep(DEAD_ENGINE_GRACE_S)  # the jobs in flight post their errors
        self._exit(1)
