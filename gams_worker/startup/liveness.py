"""Liveness: the deadlines the engine must meet, and the one way the worker ends when it misses one.

A vLLM engine can fail in three ways that no job can repair:

- it dies (its engine core exits): vLLM marks itself ``errored`` and fails every request in
  flight with EngineDeadError;
- it hangs while serving: requests are in flight and the engine core produces nothing (a stuck
  GPU or collective, a stopped process); vLLM waits for it forever;
- it hangs while starting: vLLM waits for its engine core without end in some phases.

Each ends the same way: one critical line, the engine's processes killed, exit status 1, so that
RunPod replaces the worker. A hung engine is killed before the exit so that vLLM fails the
requests in flight as it does for a dead one: their jobs end with an error posted, not lost.

The serving deadline (ENGINE_STALL_TIMEOUT_S) is measured on the engine's output: vLLM's front
end ends its handling of every message from its engine core with one call of its output
processor's ``update_scheduler_stats``, with vLLM's stats on or off (LOG_ENGINE_STATS), and
``StepClock`` stamps the time there. That is one attribute write per engine step, on the event
loop, and nothing per token; a watchdog thread reads it twice a second.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Optional, Set

log = logging.getLogger(__name__)

# Seconds a dead engine's in-flight jobs get to post their errors before the process exits.
DEAD_ENGINE_GRACE_S = 1.0
# Seconds vLLM gets, after a hung engine's processes are killed, to see them gone and fail the
# requests in flight (it notices within a second; this bounds a front end that is stuck too).
HUNG_ENGINE_DEATH_WAIT_S = 10.0
# Seconds the start gets to end by itself after its processes were killed at the start deadline.
START_KILL_GRACE_S = 15.0
# Seconds to wait for a failed attempt's child processes to exit before killing them.
CHILD_EXIT_TIMEOUT_S = 30.0


def exit_now(status: int) -> None:
    logging.shutdown()
    os._exit(status)


# --- the engine's processes ----------------------------------------------------------


def child_pids() -> Set[int]:
    """Process ids of this process's children and theirs, multiprocessing's helpers left out."""
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)
            if not _is_multiprocessing_helper(child)}


def _is_multiprocessing_helper(process: Any) -> bool:
    """multiprocessing's resource tracker lives as long as this process and must be left alone."""
    try:
        command = " ".join(process.cmdline())
    except Exception:
        return False
    return "resource_tracker" in command or "forkserver" in command


def kill_processes(pids: Iterable[int]) -> int:
    """SIGKILL each of ``pids`` that still runs (a stopped process too); how many were killed."""
    import psutil

    killed = 0
    for pid in pids:
        try:
            psutil.Process(pid).kill()
            killed += 1
        except psutil.Error:  # gone already
            pass
    return killed


def wait_for_children_gone(before: Set[int], timeout_s: float = CHILD_EXIT_TIMEOUT_S) -> None:
    """Wait for child processes started since ``before`` to exit; kill those that don't.

    A failed attempt's engine core (and its GPU memory) must be gone before the next one.
    """
    import psutil

    new = [psutil.Process(pid) for pid in child_pids() - before if psutil.pid_exists(pid)]
    if not new:
        return
    _, alive = psutil.wait_procs(new, timeout=timeout_s)
    for process in alive:
        log.warning("killing engine child process %d left over from the failed attempt", process.pid)
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


# --- the start deadline ----------------------------------------------------------------


class StartDeadline:
    """ENGINE_START_TIMEOUT_S over the whole engine start: every attempt of the fallback ladder.

    On expiry: one critical line, and the processes started since the deadline was set are
    killed, which ends vLLM's wait for them; the ladder sees ``expired`` and raises
    EngineStartError, and the worker exits 1. Should the start not end within ``grace_s`` of the
    kill (this process itself is stuck), the deadline ends the process. ``timeout_s`` 0: no deadline.
    """

    def __init__(self, timeout_s: float, grace_s: float = START_KILL_GRACE_S,
                 kill: Callable[[Iterable[int]], Any] = kill_processes,
                 exit_process: Callable[[int], None] = exit_now):
        self.timeout_s = timeout_s
        self.expired = False
        self._grace_s = grace_s
        self._kill = kill
        self._exit = exit_process
        self._children_before = child_pids()
        self._done = threading.Event()
        if timeout_s:
            threading.Thread(target=self._watch, name="engine-start-deadline", daemon=True).start()

    def done(self) -> None:
        """The start ended (started, failed or stopped): the deadline no longer applies."""
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
        self._kill(child_pids() - self._children_before)
        if self._done.wait(self._grace_s):
            return
        log.critical("engine start: still not ended %g s after its processes were killed; exiting with status 1",
                     self._grace_s)
        self._kill(child_pids() - self._children_before)  # any started since
        self._exit(1)


# --- serving: dead or hung ---------------------------------------------------------------


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


def requests_in_flight(engine: Any) -> int:
    """Requests vLLM's output processor tracks (a plain counter, safe to read from another thread)."""
    output_processor = getattr(engine, "output_processor", None)
    return output_processor.get_num_unfinished_requests() if output_processor is not None else 0


class EngineWatchdog:
    """Exits the process non-zero once the engine is dead or hung, so RunPod replaces the worker.

    A dead vLLM engine never recovers; a worker that stayed up with it would take jobs only to
    fail them. Hung: requests in flight and no output from the engine (``clock``) for
    ``stall_timeout_s`` (0: never); the time counts from the later of the last output and the
    moment requests were first seen in flight, so a request after a long idle time starts
    afresh. ``engine_pids``: the engine's processes, killed when it hangs. ``stop()`` before a
    clean shutdown, which also ends the engine.
    """

    def __init__(self, engine: Any, clock: Optional[StepClock] = None, stall_timeout_s: float = 0,
                 engine_pids: Iterable[int] = (), interval_s: float = 0.5,
                 kill: Callable[[Iterable[int]], Any] = kill_processes,
                 exit_process: Callable[[int], None] = exit_now):
        self._engine = engine
        self._clock = clock
        self._stall_timeout_s = stall_timeout_s if clock is not None else 0
        self._engine_pids = tuple(engine_pids)
        self._interval_s = interval_s
        self._kill = kill
        self._exit = exit_process
        self._busy_since: Optional[float] = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def quiet_for(self, now: float) -> Optional[float]:
        """Seconds the engine has had requests in flight without producing output; None when idle."""
        if requests_in_flight(self._engine) == 0:
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
            if self._stall_timeout_s:
                quiet = self.quiet_for(time.monotonic())
                if quiet is not None and quiet > self._stall_timeout_s:
                    self._end(f"the vLLM engine is hung: no output for {quiet:.1f} s with "
                              f"{requests_in_flight(self._engine)} requests in flight (ENGINE_STALL_TIMEOUT_S="
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
