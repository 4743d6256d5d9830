"""The runpod SDK's job loop (runpod 1.12.0, rp_scale.py) with its waits replaced by events, each job counted
once from its take to the end of its task: a take comes the moment a job ends, a job starts the moment it is
taken, and a take the SDK could not parse still fails each of its jobs (MAINTAINERS.md, "The job loop")."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any, Dict, List, Optional, Set

from runpod.http_client import TooManyRequests
from runpod.serverless.modules import rp_http, rp_job, rp_scale

from gams_worker.platform.poster import ResultPoster
from gams_worker.platform.sdk_version import check_sdk_version
from gams_worker.platform.unreadable import UnreadableJob

log = rp_scale.log  # the SDK's logger: same format and RUNPOD_LOG_LEVEL as the rest of its loop
EMPTY_POLL_FLOOR_S = 1.0  # the SDK's pause after an empty stop poll, here from the poll's start


async def take_jobs(session, num_jobs: int = 1) -> Optional[List[Dict[str, Any]]]:
    """The SDK's ``rp_job.get_job``, with the body parsed by ``read_take``."""
    async with session.get(rp_job._job_get_url(num_jobs)) as response:
        if response.status in (204, 400):  # no jobs; 400 is expected with FlashBoot (the SDK's words)
            return None
        if response.status == 429:
            raise TooManyRequests(response.request_info, response.history, status=response.status,
                                  message=response.reason)
        response.raise_for_status()
        if response.content_type != "application/json" or response.content_length == 0:
            return None
        body = await response.text()
    return await read_take(body)


async def read_take(body: str) -> Optional[List[Dict[str, Any]]]:
    """The jobs of a take (one job, or a list of them); a job that cannot be answered is logged."""
    try:
        jobs = json.loads(body)
    except (RecursionError, ValueError) as exc:
        why = ("nests deeper than Python's JSON parser can follow" if isinstance(exc, RecursionError)
               else f"is not valid JSON ({exc})")
        job_ids = await asyncio.to_thread(job_ids_in, body)  # a scan of up to RunPod's 20 MB
        log.error(f"JobLoop.take | a take of {len(body)} characters {why}: failing its jobs {job_ids}")
        return [UnreadableJob(job_id, why) for job_id in job_ids] or None
    jobs = [jobs] if isinstance(jobs, dict) else jobs if isinstance(jobs, list) else []
    answerable = [job for job in jobs if isinstance(job, dict) and isinstance(job.get("id"), str)]
    if len(answerable) < len(jobs):
        log.error(f"JobLoop.take | {len(jobs) - len(answerable)} jobs of a take have no id: they cannot be answered")
    return answerable or None


# The tokens of JSON text that matter for finding the jobs' ids: strings and structure.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:,]')


def job_ids_in(body: str) -> List[str]:
    """The string ``id`` of each job (the top-level object, or each of the top-level list) in a take's
    text, by a scan that follows the depth without parsing, so no nesting can make it fail."""
    job_depth = 2 if body.lstrip().startswith("[") else 1
    depth, key, ids = 0, None, []
    for match in _JSON_TOKENS.finditer(body):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            key = None if depth < job_depth else key
        elif depth != job_depth or token == ":":
            continue
        elif token == ",":
            key = None  # the next string is a key
        elif key is None:
            key = token
        elif key == '"id"' and token.startswith('"'):
            ids.append(json.loads(token))
    return ids


class JobLoop(rp_scale.JobScaler):
    def __init__(self, config):
        super().__init__(config)
        if self.jobs_fetcher is rp_scale.get_job:  # not replaced through the SDK's local-test config
            self.jobs_fetcher = take_jobs
        self.jobs_in_flight = 0  # taken and not yet ended, queued or running: each job once
        self._slot_freed = asyncio.Event()  # get_jobs waits on it when full
        self._jobs_to_start = asyncio.Event()  # run_jobs waits on it
        self._taking = True  # get_jobs may still bring jobs in
        self._drained = asyncio.Event()  # set once the loop stops and no taken job is left
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        if self.jobs_handler is rp_job.handle_job and ResultPoster.serves(config):
            self.jobs_handler = ResultPoster(rp_http.JOB_STREAM_URL, rp_http.JOB_DONE_URL).run_job

    def current_occupancy(self) -> int:
        return self.jobs_in_flight

    async def run(self):
        self._loop = asyncio.get_running_loop()
        await super().run()

    def kill_worker(self):  # from the SIGTERM handler too: the loops are woken through the event loop's pipe
        super().kill_worker()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._slot_freed.set)
            self._loop.call_soon_threadsafe(self._jobs_to_start.set)

    async def get_jobs(self, session):
        try:
            while self.is_alive():
                await self.set_scale()
                self._slot_freed.clear()
                jobs_needed = self.current_concurrency - self.current_occupancy()
                if jobs_needed <= 0:
                    log.debug("JobLoop.get_jobs | Full; taking again when a job ends.")
                    await self._slot_freed.wait()
                    continue
                try:
                    acquired_jobs = await asyncio.wait_for(self.jobs_fetcher(session, jobs_needed),
                                                           timeout=self.jobs_fetcher_timeout)
                    if not acquired_jobs:
                        log.debug("JobLoop.get_jobs | No jobs acquired.")
                        continue
                    await self._queue(acquired_jobs)
                # The SDK's handling of a failed take, unchanged.
                except TooManyRequests:
                    log.debug("JobLoop.get_jobs | Too many requests. Debounce for 5 seconds.")
                    await asyncio.sleep(5)
                except asyncio.CancelledError:
                    log.debug("JobLoop.get_jobs | Request was cancelled.")
                    raise
                except asyncio.TimeoutError:
                    log.debug("JobLoop.get_jobs | Job acquisition timed out. Retrying.")
                except TypeError as error:
                    log.debug(f"JobLoop.get_jobs | Unexpected error: {error}.")
                except Exception as error:
                    log.error(f"Failed to get job. | Error Type: {type(error).__name__} | "
                              f"Error Message: {str(error)}")
                finally:
                    await asyncio.sleep(0)
        finally:
            self._taking = False
            self._jobs_to_start.set()

    async def _queue(self, jobs: List[Dict[str, Any]]) -> None:
        """Count each taken job in flight, and hand it to run_jobs."""
        for job in jobs:
            self.jobs_in_flight += 1
            self.job_progress.add(job)
            self._jobs_to_start.set()  # before a put that may wait for run_jobs
            await self.jobs_queue.put(job)
            log.debug("Job Queued", job["id"])
        log.info(f"Jobs in queue: {self.jobs_queue.qsize()}")

    async def run_jobs(self, session):
        tasks: Set[asyncio.Task] = set()
        last_task_count = 0

        def task_ended(task: asyncio.Task) -> None:
            tasks.discard(task)
            self._jobs_to_start.set()  # its slot may start a job that waited for one

        while self.is_alive() or self._taking or not self.jobs_queue.empty():
            self._jobs_to_start.clear()
            while len(tasks) < self.current_concurrency and not self.jobs_queue.empty():
                job = self.jobs_queue.get_nowait()
                task = asyncio.create_task(self.handle_job(session, job))
                tasks.add(task)
                task.add_done_callback(task_ended)
                self.jobs_tasks[job["id"]] = task
            if len(tasks) != last_task_count:
                log.info(f"Jobs in progress: {len(tasks)}")
                last_task_count = len(tasks)
            await self._jobs_to_start.wait()
        # Drain on shutdown: stopped jobs end in CancelledError; other errors are logged.
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception) and not isinstance(result, asyncio.CancelledError):
                log.error(f"JobLoop.run_jobs | Task failed during shutdown drain: {result}")
        self._drained.set()

    async def monitor_stop_signals(self, session):
        """The SDK's loop over the stop channel; an empty poll's 1 s pause counts from the poll's start,
        and polls go on while taken jobs drain after SIGTERM."""
        if self.stop_signals_fetcher is rp_job.get_stop_signals and rp_job._job_stop_url() is None:
            await super().monitor_stop_signals(session)  # warns that per-job stop is off, and returns
            return
        drained = asyncio.ensure_future(self._drained.wait())
        poll: Optional[asyncio.Future] = None
        try:
            while not drained.done():
                polled_at = time.monotonic()
                poll = asyncio.ensure_future(asyncio.wait_for(self.stop_signals_fetcher(session),
                                                              timeout=self.stop_signals_fetcher_timeout))
                await asyncio.wait((poll, drained), return_when=asyncio.FIRST_COMPLETED)
                if not poll.done():
                    return  # drained after SIGTERM: no job is left to stop (the poll is ended below)
                try:
                    job_ids = poll.result()
                    for job_id in job_ids:
                        await self.stop_job(job_id)
                    if not job_ids:  # no busy spin on a server that answers at once
                        pause_s = max(0.0, polled_at + EMPTY_POLL_FLOOR_S - time.monotonic())
                        await asyncio.wait((drained,), timeout=pause_s)
                # The SDK's handling of a failed poll, unchanged.
                except TooManyRequests:
                    await asyncio.sleep(5)
                except asyncio.TimeoutError:
                    log.debug("JobLoop.monitor_stop_signals | Stop poll timed out. Retrying.")
                except Exception as error:
                    log.error(f"JobLoop.monitor_stop_signals | Error Type: {type(error).__name__} | "
                              f"Error Message: {str(error)}")
                    await asyncio.sleep(1)
        finally:
            drained.cancel()
            if poll is not None and not poll.done():
                poll.cancel()
                await asyncio.gather(poll, return_exceptions=True)

    async def handle_job(self, session, job):
        try:
            await super().handle_job(session, job)
        finally:
            self.jobs_in_flight -= 1
            self._slot_freed.set()


def install_job_loop() -> None:
    """Make ``runpod.serverless.start`` run JobLoop; SdkVersionError on an SDK it was not written for."""
    check_sdk_version()
    rp_scale.JobScaler = JobLoop
