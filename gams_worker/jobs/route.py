"""Which dialect a job speaks, decided once: RunPod's OpenAI passthrough or a plain job.

A job whose input holds ``openai_route`` came from RunPod's ``/openai/v1`` surface and goes
to vLLM's OpenAI serving layer (gams_worker/jobs/openai.py); every other job is a plain job
(gams_worker/jobs/plain.py). An exception that escapes either (a bug) still ends the job
with an error of its dialect, so that every job error a client sees is JSON (gams_worker/errors.py).

A job whose take the worker could not read (gams_worker/platform/job_loop.py: nested too deep
for Python's JSON parser, or not JSON) carries only its id and why; it fails with an
``invalid_input`` error naming ``input``, in the plain shape, since its dialect is unknown.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, AsyncIterator, Dict, Mapping

from gams_worker.errors import INVALID_INPUT, WORKER_ERROR, OpenAIRequestError, error_output
from gams_worker.jobs.openai import OpenAIJobs
from gams_worker.jobs.plain import PlainJobs

log = logging.getLogger(__name__)

# The key of a job whose take could not be read: why, in plain words (set by the job loop's take).
UNREADABLE_JOB = "gams_worker_unreadable"


def is_openai_job(job_input: Any) -> bool:
    return isinstance(job_input, Mapping) and "openai_route" in job_input


def worker_error_output(job_input: Any, message: str) -> Dict[str, str]:
    """The error output of a job the worker itself failed on (a bug), in the job's dialect."""
    if is_openai_job(job_input):
        return OpenAIRequestError(message, None, HTTPStatus.INTERNAL_SERVER_ERROR).to_output()
    return error_output(WORKER_ERROR, message)


class JobRouter:
    """Runs each job in its dialect; counts the jobs in flight."""

    def __init__(self, plain: PlainJobs, openai: OpenAIJobs):
        self.plain = plain
        self.openai = openai
        self.running_jobs = 0  # the status endpoint and tests read it

    async def run(self, job: Dict[str, Any]) -> AsyncIterator[Any]:
        """Yield the job's outputs; closing this generator closes the dialect's at once (a
        stopped job's engine request is aborted in its ``finally``)."""
        if UNREADABLE_JOB in job:
            yield error_output(INVALID_INPUT, job[UNREADABLE_JOB], "input")
            return
        job_input = job.get("input")
        outputs = self.openai.run(job_input) if is_openai_job(job_input) else self.plain.run(job)
        self.running_jobs += 1
        try:
            async for output in outputs:
                yield output
        except Exception as exc:
            log.exception("job %s failed in the worker", job.get("id"))
            yield worker_error_output(job_input, f"the worker failed on this job: {type(exc).__name__}: {exc}")
        finally:
            self.running_jobs -= 1
            await outputs.aclose()
