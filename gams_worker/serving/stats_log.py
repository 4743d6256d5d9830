"""vLLM's stats line (throughput, KV cache usage, prefix cache hits), logged as `vllm serve` logs it:
an in-process engine collects them (LOG_ENGINE_STATS) but logs them only when asked."""

from __future__ import annotations

import asyncio
from typing import Any, Optional


class EngineStatsLog:
    """Asks ``engine`` to log its stats every ``interval_s``, in the loop where vLLM records them."""

    def __init__(self, engine: Any, interval_s: float = 10.0):
        self._engine = engine
        self._interval_s = interval_s
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._log_every_interval())

    async def _log_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self._engine.do_log_stats()
