"""A job's dialect, decided once (``openai_route`` in its input: vLLM's OpenAI layer; else a plain
job), and the one place a job's stream is closed. An exception that escapes a dialect (a bug)
still ends the job with a JSON error of that dialect."""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any, AsyncGenerator, Dict, Mapping, Set

from gams_worker.errors import WORKER_ERROR, OpenAIRequestError, error_output
from gams_worker.jobs.openai import OpenAIJobs
from gams_worker.jobs.plain import PlainJobs

log = logging.getLogger(__name__)


def is_openai_job(job_input: Any) -> bool:
    return isinstance(job_input, Mapping) and "openai_route" in job_input


def worker_error_output(job_input: Any, message: str) -> Dict[str, str]:
    """The error output of a job the worker itself failed on (a bug), in the job's dialect."""
    if is_openai_job(job_input):
        return OpenAIRequestError(message, None, HTTPStatus.INTERNAL_SERVER_ERROR).to_output()
    return error_output(WORKER_ERROR, message)


class JobDispatch:
    """Runs each job in its dialect; counts the jobs in flight."""

    def __init__(self, plain: PlainJobs, openai: OpenAIJobs):
        self.plain = plain
        self.openai = openai
        self.running_jobs = 0  # the status endpoint and tests read it
        self._closing: Set[asyncio.Future] = set()  # streams of cancelled jobs being closed

    def run(self, job: Dict[str, Any]) -> AsyncGenerator[Any, None]:
        """The job's outputs, closed at once when the job's task is cancelled: the SDK may keep a
        stopped job's generator referenced for seconds, and closing it frees its engine request."""
        outputs = self._outputs(job)
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(lambda done: self._close(outputs) if done.cancelled() else None)
        return outputs

    def _close(self, outputs: AsyncGenerator) -> None:
        closing = asyncio.ensure_future(outputs.aclose())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _outputs(self, job: Dict[str, Any]) -> AsyncGenerator[Any, None]:
        """The dialect's outputs; its stream is closed when this one ends or is closed."""
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
