"""The engine's facts as the job path reports them: types at the bottom, so that jobs/ can name them."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Protocol


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What a job's metadata reports about the engine serving it."""

    mode: str  # graph mode: full, piecewise or eager
    reason: str  # why the engine runs in this mode, in plain words
    platform: str  # "cuda" or "cpu"
    start_seconds: float
    plan: str = ""  # the card plan's line: what was chosen for this GPU, and why

    def to_output(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class StartupReport(Protocol):
    """The start-up timeline (startup/timeline.py), which the first job served marks and reports."""

    def mark(self, step: str) -> float: ...

    def to_output(self) -> Dict[str, Any]: ...
