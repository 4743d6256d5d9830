"""The start-up timeline: where a cold start's seconds go, from process start to the first job. Our steps
are marked as they happen, vLLM's phases as their lines of the engine's output arrive; every second of a
start belongs to a named step (``step_s``), and vLLM's own durations are kept in ``engine_phases_s``."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

# (phase, pattern with the seconds as group 1), as vLLM 0.32 logs them.
ENGINE_PHASES: Tuple[Tuple[str, "re.Pattern[str]"], ...] = (
    ("weights_loaded_s", re.compile(r"Model loading took [\d.]+ GiB (?:memory )?and ([\d.]+) seconds")),
    ("weights_loaded_s", re.compile(r"Loading weights took ([\d.]+) seconds")),
    ("compiled_s", re.compile(r"torch\.compile (?:takes|took) ([\d.]+) s in total")),
    ("graphs_captured_s", re.compile(r"Graph capturing finished in ([\d.]+) secs?")),
    ("kv_allocated_and_warmed_s",
     re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s")),
)

ENGINE_PROCESS_STARTED = "vLLM: engine process started"
WEIGHTS_LOADING = "vLLM: weights loading"
# The lines that end each of vLLM's start-up phases, in order; each is marked once per engine process.
ENGINE_MARKS: Tuple[Tuple[str, "re.Pattern[str]"], ...] = (
    ("vLLM: model config read", re.compile(r"Resolved architecture")),
    (ENGINE_PROCESS_STARTED, re.compile(r"Initializing a V1 LLM engine")),
    (WEIGHTS_LOADING, re.compile(r"Starting to load model")),
    ("vLLM: weights loaded", re.compile(r"Model loading took|Loading weights took")),
    ("vLLM: compiled model loading", re.compile(r"Directly load AOT compilation")),  # warm AOT cache
    ("vLLM: compiled model saved", re.compile(r"saved AOT compiled function")),  # cold: compiled
    ("vLLM: torch.compile done", re.compile(r"torch\.compile (?:takes|took) [\d.]+ s in total")),
    ("vLLM: KV cache sized", re.compile(r"(?:GPU|CPU) KV cache size")),
    ("vLLM: CUDA graphs captured", re.compile(r"Graph capturing finished")),
    ("vLLM: engine initialised", re.compile(r"init engine \(profile, create kv cache, warmup model\) took")),
)


def process_start_time() -> float:
    """When this process started (epoch seconds), exact to a clock tick: psutil's create_time can be
    a second off (it adds the boot time, which /proc gives in whole seconds)."""
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22, starttime; fields[0] is field 3
        age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age_s
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux: count from now
        return time.time()


class StartupTimeline:
    def __init__(self, started_at: Optional[float] = None):
        self.started_at = process_start_time() if started_at is None else started_at
        self.marks: List[Tuple[str, float]] = []
        self.engine_phases: Dict[str, float] = {}
        self.compile_cache: Optional[Dict[str, Any]] = None  # CompileCache.report() of this start
        self._lock = threading.Lock()  # engine lines are marked from the output-tee threads
        self._engine_marks_seen: set = set()
        self._phase_rank: Dict[str, int] = {}  # phase -> index in ENGINE_PHASES of the pattern that gave it
        self._watching = True

    def mark(self, step: str, at: Optional[float] = None, log_it: bool = True) -> float:
        """Record that ``step`` is done (now, or at epoch time ``at``); returns seconds since process start.
        A step marked again (a second engine start) gets " #2", " #3"."""
        seconds = round((time.time() if at is None else at) - self.started_at, 2)
        with self._lock:
            names = {name for name, _ in self.marks}
            name, count = step, 1
            while name in names:
                count += 1
                name = f"{step} #{count}"
            self.marks.append((name, seconds))
        if log_it:
            log.info("start-up: %s at %.2f s", name, seconds)
        return seconds

    def watch_engine_line(self, line: str, at: Optional[float] = None) -> Optional[str]:
        """Mark the vLLM phase that ``line`` ends, at its arrival; return the mark (ENGINE_MARKS), or None."""
        if not self._watching:
            return None
        self.read_engine_output(line)
        for step, pattern in ENGINE_MARKS:
            if pattern.search(line):
                if step == ENGINE_PROCESS_STARTED:  # a new engine process: its phases start over
                    self._engine_marks_seen = set()
                if step in self._engine_marks_seen:
                    return None
                self._engine_marks_seen.add(step)
                # Not logged: a log line written into the pipe this thread drains could block it for good.
                self.mark(step, at, log_it=False)
                return step
        return None

    def stop_watching(self) -> None:  # the engine is up: its later lines mark nothing
        self._watching = False

    def read_engine_output(self, text: str) -> None:
        """Pick the engine's inner phase durations out of its log lines; of two patterns of one phase,
        the earlier in ENGINE_PHASES wins, whichever line came first."""
        for rank, (phase, pattern) in enumerate(ENGINE_PHASES):
            if self._phase_rank.get(phase, len(ENGINE_PHASES)) <= rank:
                continue
            match = pattern.search(text)
            if match:
                self.engine_phases[phase] = float(match.group(1))
                self._phase_rank[phase] = rank

    def to_output(self) -> Dict[str, Any]:
        with self._lock:
            marks = sorted(self.marks, key=lambda mark: mark[1])
        steps, previous = {}, 0.0
        for name, seconds in marks:
            steps[name] = round(seconds - previous, 2)
            previous = seconds
        return {"since_process_start_s": dict(marks), "step_s": steps, "engine_phases_s": dict(self.engine_phases),
                "compile_cache": self.compile_cache}
