"""The engine's processes, found one way (not vLLM's other subprocesses, nor multiprocessing's
helpers), and the one way this process ends."""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import sys
from typing import Iterable, NoReturn, Set

log = logging.getLogger(__name__)

# Seconds a failed start's engine processes get to exit before they are killed.
CHILD_EXIT_TIMEOUT_S = 30.0


def engine_pids() -> Set[int]:
    """The processes multiprocessing started here (vLLM's engine core) and all of theirs."""
    import psutil

    pids = set()
    for child in multiprocessing.active_children():
        pids.add(child.pid)
        try:
            pids.update(descendant.pid for descendant in psutil.Process(child.pid).children(recursive=True))
        except psutil.Error:  # gone meanwhile
            pass
    return pids


def kill_processes(pids: Iterable[int]) -> None:
    """SIGKILL each of ``pids`` that still runs (a stopped process too)."""
    import psutil

    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:  # gone already
            pass


def wait_for_engine_gone(before: Set[int], timeout_s: float = CHILD_EXIT_TIMEOUT_S) -> None:
    """Wait for the engine processes started since ``before`` (a failed attempt's) to exit; kill the rest."""
    import psutil

    new = [psutil.Process(pid) for pid in engine_pids() - before if psutil.pid_exists(pid)]
    _, alive = psutil.wait_procs(new, timeout=timeout_s)
    for process in alive:
        log.warning("killing engine child process %d left over from the failed attempt", process.pid)
    kill_processes(process.pid for process in alive)
    psutil.wait_procs(alive, timeout=10)


def end_process(status: int, run_exit_handlers: bool = False) -> NoReturn:
    """Exit with ``status``, skipping the interpreter's teardown (only noise: MAINTAINERS.md). A clean
    end runs the exit handlers (the SDK's heartbeat process ends); a failing engine's end does not."""
    if run_exit_handlers:
        atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
