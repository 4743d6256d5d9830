"""This process's own start-up work around vLLM's engine process: run while it starts, frozen after.

Work that holds the GIL (an import, a garbage collection) delays the engine's start by its whole
length when it runs beside vLLM's own imports and set-up in this process. Once vLLM's engine
process runs, this process only waits for it, so the same work costs nothing (``WhileEngineStarts``).
What start-up made lives as long as the process: once the engine runs, it is frozen out of the
garbage collector's full collections (``freeze_startup_heap``).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import threading
from typing import Any, Callable, Sequence, Set, Tuple

from gams_worker.startup.timeline import StartupTimeline

log = logging.getLogger(__name__)


class WhileEngineStarts:
    """Runs start-up work in a thread once vLLM's engine process runs.

    vLLM starts its engine process with multiprocessing; the thread looks for a new one every
    50 ms (subprocesses vLLM runs before, such as its model inspection, are not among them).
    """

    POLL_S = 0.05

    def __init__(self, tasks: Sequence[Tuple[str, Callable[[], Any]]], timeline: StartupTimeline):
        self.tasks = list(tasks)  # (the timeline mark when done, the work)
        self.timeline = timeline
        self._children_before = _engine_processes()
        self._released = threading.Event()  # set by finish(): run now, whatever runs
        self._skip_rest = False
        self._thread = threading.Thread(target=self._run, name="while-engine-starts", daemon=True)
        if self.tasks:
            self._thread.start()

    def finish(self, run_the_rest: bool = True) -> None:
        """The engine start ended: run what has not run (or skip it, after a failed start) and wait."""
        self._skip_rest = not run_the_rest
        self._released.set()
        if self.tasks:
            self._thread.join()

    def _run(self) -> None:
        while not self._released.wait(self.POLL_S):
            if _engine_processes() - self._children_before:
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
    """Keep full garbage collections from walking what start-up made (it lives as long as the
    process): they paused every stream for up to 0.36 s on CPU. vLLM's own server does the same.

    The collection before the freeze (0.4 s of CPU) ran while the engine started
    (WhileEngineStarts); a failed first attempt left garbage since, so it is collected again."""
    if fell_back:
        gc.collect()
    gc.freeze()


def _engine_processes() -> Set[int]:
    """Process ids of the live children that multiprocessing started (vLLM's engine core)."""
    return {child.pid for child in multiprocessing.active_children()}
