"""The start-up timeline: where a cold start's seconds go, from process start to the first job.

Our own steps are marked as they happen. The engine's inner phases (weights loaded,
torch.compile, CUDA-graph capture, KV cache allocation) happen inside vLLM's engine
process, so their durations are read from the lines vLLM logs, which the start-up
captures anyway (gams_worker/startup/engine_log.py).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

# (phase, pattern with the seconds as group 1), as vLLM 0.25-0.33 log them.
ENGINE_PHASES: Tuple[Tuple[str, "re.Pattern[str]"], ...] = (
    ("weights_loaded_s", re.compile(r"Model loading took [\d.]+ GiB (?:memory )?and ([\d.]+) seconds")),
    ("weights_loaded_s", re.compile(r"Loading weights took ([\d.]+) seconds")),
    ("compiled_s", re.compile(r"torch\.compile (?:takes|took) ([\d.]+) s in total")),
    ("graphs_captured_s", re.compile(r"Graph capturing finished in ([\d.]+) secs?")),
    ("kv_allocated_and_warmed_s",
     re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s")),
)


def process_start_time() -> float:
    """When this process started (epoch seconds): a container's start, for `python handler.py`."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil missing or /proc unreadable: count from now
        return time.time()


class StartupTimeline:
    def __init__(self, started_at: Optional[float] = None):
        self.started_at = process_start_time() if started_at is None else started_at
        self.marks: List[Tuple[str, float]] = []
        self.engine_phases: Dict[str, float] = {}
        self.compile_cache: Optional[Dict[str, Any]] = None  # CompileCache.report() of this start

    def mark(self, step: str) -> float:
        """Record that ``step`` is done; returns seconds since process start."""
        seconds = round(time.time() - self.started_at, 2)
        self.marks.append((step, seconds))
        log.info("start-up: %s at %.2f s", step, seconds)
        return seconds

    def read_engine_output(self, text: str) -> None:
        """Pick the engine's inner phase durations out of its captured log lines."""
        for phase, pattern in ENGINE_PHASES:
            match = pattern.search(text)
            if match and phase not in self.engine_phases:
                self.engine_phases[phase] = float(match.group(1))

    def to_output(self) -> Dict[str, Any]:
        return {
            "since_process_start_s": dict(self.marks),
            "engine_phases_s": dict(self.engine_phases),
            "compile_cache": self.compile_cache,
        }
