"""Graph-mode fallback: start the engine down the ladder full -> piecewise -> eager, each attempt's output
captured and classified (start_failure.py): a failed capture retries lower, a cause no mode fixes ends
the start, and a warm compile cache that broke it is set aside for one more try in the same mode.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from typing import Any, Callable, FrozenSet, List, Optional, Tuple, Union

from gams_worker.config import WorkerConfig
from gams_worker.errors import EngineStartError
from gams_worker.processes import engine_pids, wait_for_engine_gone
from gams_worker.startup.compile_cache import CompileCache
from gams_worker.startup.engine import GRAPH_MODES
from gams_worker.startup.output_capture import OutputCapture
from gams_worker.startup.start_deadline import StartDeadline
from gams_worker.startup.start_failure import FATAL, RETRY_EMPTY_CACHE, classify_start_failure

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StartedEngine:
    engine: Any
    mode: str
    reason: str  # why the engine runs in ``mode``, in plain words
    output: str = ""  # what the successful attempt printed (vLLM's start-up log lines)
    compile_cache: Optional[CompileCache] = None  # the folder it started with (emptied, if it was damaged)
    process_ids: FrozenSet[int] = frozenset()  # the engine's processes (its core and workers)


def start_with_fallback(config: WorkerConfig, first_mode: str, first_reason: str, start: Callable[[str], Any],
                        on_output_line: Optional[Callable[[str, float], None]] = None,
                        compile_cache: Optional[CompileCache] = None,
                        deadline: Optional[StartDeadline] = None) -> StartedEngine:
    """``start(mode)`` from ``first_mode`` down the ladder as causes allow, else EngineStartError with one
    plain-words line; ``on_output_line`` gets each line the engine prints and its arrival time."""
    try:
        return _Ladder(config, start, on_output_line, compile_cache, deadline).climb(first_mode, first_reason)
    finally:
        if deadline is not None:
            deadline.done()


@dataclasses.dataclass(frozen=True)
class _FailedAttempt:
    failure: Exception
    output: str  # what the attempt printed
    spent_s: float


@dataclasses.dataclass
class _Ladder:
    config: WorkerConfig
    start: Callable[[str], Any]
    on_output_line: Optional[Callable[[str, float], None]]
    compile_cache: Optional[CompileCache]
    deadline: Optional[StartDeadline]
    failed_modes: List[str] = dataclasses.field(default_factory=list)
    cache_emptied: bool = False  # at most once per start

    def climb(self, mode: str, reason: str) -> StartedEngine:
        while True:
            log.info("engine start: rung %d/%d, %s mode (%s)", GRAPH_MODES.index(mode) + 1, len(GRAPH_MODES),
                     mode, reason)
            attempt = self._attempt(mode, reason)
            if isinstance(attempt, StartedEngine):
                return attempt
            mode, reason = self._next_rung(mode, reason, attempt)

    def _attempt(self, mode: str, reason: str) -> Union[StartedEngine, _FailedAttempt]:
        """One start in ``mode``, its output captured; a failed one's processes are gone when it returns."""
        children_before = engine_pids()
        started = time.monotonic()
        capture = OutputCapture(on_line=self.on_output_line).start()
        try:
            engine = self.start(mode)
        except Exception as exc:  # vLLM raises many types; the classifier reads them all
            capture.stop()
            spent = time.monotonic() - started
            wait_for_engine_gone(children_before)
            if self.deadline is not None and self.deadline.expired:
                raise EngineStartError(self.deadline.message(mode), "engine start timed out") from exc
            return _FailedAttempt(exc, capture.text(), spent)
        capture.stop()
        if capture.watcher_error is not None:
            log.warning("engine output watcher failed: %r", capture.watcher_error)
        if self.deadline is not None and self.deadline.expired:  # it started as the deadline killed it
            engine.shutdown()
            raise EngineStartError(self.deadline.message(mode), "engine start timed out")
        return StartedEngine(engine, mode, reason, capture.text(settle_s=0.1, max_wait_s=1.0), self.compile_cache,
                             frozenset(engine_pids() - children_before))

    def _next_rung(self, mode: str, reason: str, attempt: _FailedAttempt) -> Tuple[str, str]:
        """The mode to try next and why: the same with the compile cache set aside, a lower rung, or none."""
        cache = self.compile_cache
        warm = cache is not None and not self.cache_emptied and cache.before.compiled > 0
        failure_text = "".join(traceback.format_exception(attempt.failure))  # with its chain of causes
        diagnosis = classify_start_failure(attempt.output + "\n" + failure_text, mode,
                                           warm_cache=cache.path if warm else None)
        log.error("engine start in %s mode failed after %.1f s; cause: %s; evidence: %s",
                  mode, attempt.spent_s, diagnosis.cause, diagnosis.evidence or "(none)")
        failed = f"engine start failed in {mode} mode: {diagnosis.cause} ({diagnosis.evidence}); "
        if diagnosis.decision == RETRY_EMPTY_CACHE:
            try:
                self.compile_cache = cache.emptied()
            except OSError as exc:
                raise EngineStartError(failed + f"the folder could not be moved aside ({exc}): delete "
                                       f"{cache.path}", diagnosis.cause, diagnosis) from attempt.failure
            self.cache_emptied = True
            log.warning("compile cache: %s moved aside to %s, unread; retrying in %s mode with an empty folder",
                        self.compile_cache.path, self.compile_cache.set_aside[-1], mode)
            return mode, reason
        self.failed_modes.append(mode)
        if diagnosis.decision == FATAL:
            raise EngineStartError(failed + f"remedy: {diagnosis.remedy}", diagnosis.cause,
                                   diagnosis) from attempt.failure
        if not self.config.graph_fallback:
            raise EngineStartError(failed + f"GRAPH_FALLBACK=false, so no retry in {diagnosis.next_mode} mode: set "
                                   "GRAPH_FALLBACK=true or ENFORCE_EAGER=true", diagnosis.cause,
                                   diagnosis) from attempt.failure
        next_mode = diagnosis.next_mode or "eager"
        log.warning("fallback: retrying at rung %d/%d in %s mode after %.1f s because %s",
                    GRAPH_MODES.index(next_mode) + 1, len(GRAPH_MODES), next_mode, attempt.spent_s, diagnosis.cause)
        return next_mode, f"{diagnosis.cause}; fell back from {' and '.join(self.failed_modes)}"
