"""The runpod SDK's job loop, with each taken job started at once.

runpod 1.12's ``JobScaler.run_jobs`` looks at its queue of taken jobs only every
100 ms (``asyncio.wait(..., timeout=0.1)`` / ``asyncio.sleep(0.1)`` in rp_scale.py), so
a job waited 0-100 ms before its handler ran: 48 ms more time to first chunk than the
in-process handler at one job at a time (``python -m bench cpu``). ``PromptJobScaler``
is that same loop with a 5 ms look; everything else (taking jobs, stop signals,
concurrency, shutdown) stays the SDK's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Set

from runpod.serverless.modules import rp_scale

log = logging.getLogger(__name__)

JOB_PICKUP_INTERVAL_S = 0.005


class PromptJobScaler(rp_scale.JobScaler):
    async def run_jobs(self, session) -> None:
        # runpod 1.12.0's run_jobs, with its 0.1 s waits cut to JOB_PICKUP_INTERVAL_S.
        tasks: Set[asyncio.Task] = set()
        while self.is_alive() or not self.jobs_queue.empty():
            while len(tasks) < self.current_concurrency and not self.jobs_queue.empty():
                job = await self.jobs_queue.get()
                task = asyncio.create_task(self.handle_job(session, job))
                tasks.add(task)
                self.jobs_tasks[job["id"]] = task
            if tasks:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED,
                                             timeout=JOB_PICKUP_INTERVAL_S)
                tasks.difference_update(done)
            else:
                await asyncio.sleep(JOB_PICKUP_INTERVAL_S)
        # Drain on shutdown: stopped jobs end in CancelledError; other errors are logged.
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception) and not isinstance(result, asyncio.CancelledError):
                log.error("a job failed while the worker shut down: %r", result)


def use_prompt_job_scaler() -> None:
    """Make ``runpod.serverless.start`` run PromptJobScaler (it builds ``rp_scale.JobScaler``)."""
    rp_scale.JobScaler = PromptJobScaler
