"""Which dialect a job speaks, decided once: RunPod's OpenAI passthrough or a plain job.

A job whose input holds ``openai_route`` came from RunPod's ``/openai/v1`` surface and goes
to vLLM's OpenAI serving layer (gams_worker/jobs/openai.py); every other job is a plain job
(gams_worker/jobs/service.py).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Dict, Mapping

from gams_worker.jobs.openai import OpenAIRoutes
from gams_worker.jobs.service import GenerationService


class JobRouter:
    """Runs each job in its dialect; counts the jobs in flight."""

    def __init__(self, plain: GenerationService, openai: OpenAIRoutes):
        self.plain = plain
        self.openai = openai
        self.running_jobs = 0  # the status endpoint and tests read it

    async def run(self, job: Dict[str, Any]) -> AsyncIterator[Any]:
        """Yield the job's outputs; closing this generator closes the dialect's at once (a
        stopped job's engine request is aborted in its ``finally``)."""
        job_input = job.get("input")
        is_openai = isinstance(job_input, Mapping) and "openai_route" in job_input
        outputs = self.openai.run(job_input) if is_openai else self.plain.run(job)
        self.running_jobs += 1
        try:
            async for output in outputs:
                yield output
        finally:
            self.running_jobs -= 1
            await outputs.aclose()
