"""This process's own start-up work (imports, a garbage collection), deferred until vLLM's engine
process runs: beside vLLM's set-up here it would hold the GIL and delay the start by its whole length,
while once the engine process runs this process only waits. After the start, the heap is frozen."""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any, Callable, Sequence, Tuple

from gams_worker.processes import engine_pids
from gams_worker.startup.timeline import StartupTimeline

log = logging.getLogger(__name__)


class DeferredWork:
    """Runs start-up tasks in a thread once vLLM's engine process runs."""

    POLL_S = 0.05

    def __init__(self, tasks: Sequence[Tuple[str, Callable[[], Any]]], timeline: StartupTimeline):
        self.tasks = list(tasks)  # (the timeline mark when done, the work)
        self.timeline = timeline
        self._engine_before = engine_pids()
        self._released = threading.Event()  # set by finish(): run now, whatever runs
        self._skip_rest = False
        self._thread = threading.Thread(target=self._run, name="deferred-work", daemon=True)
        self._thread.start()

    def finish(self, run_the_rest: bool = True) -> None:
        """The engine start ended: run what has not run (or skip it, after a failed start) and wait."""
        self._skip_rest = not run_the_rest
        self._released.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._released.wait(self.POLL_S):
            if engine_pids() - self._engine_before:
                break
        for done_mark, work in self.tasks:
            if self._skip_rest:
                return
            try:
                work()
            except Exception as exc:  # an import the caller repeats raises there, where it matters
                log.warning("%s: failed while the engine started: %r", done_mark, exc)
                continue
            self.timeline.mark(done_mark)


def freeze_startup_heap(fell_back: bool) -> None:
    """Keep full garbage collections from walking what start-up made, which lives as long as the process
    (as vLLM's own server does); after a failed first attempt, its garbage is collected first."""
    if fell_back:
        gc.collect()
    gc.freeze()
