"""A local emulator of RunPod's worker-facing API, for the real runpod SDK job loop.

The SDK (runpod 1.12, rp_job.py / rp_http.py / rp_scale.py / rp_ping.py) talks to:

    GET  {base}/v2/{endpoint}/job-take/{worker}?gpu=..&job_in_progress=0|1         one job or 204
    GET  {base}/v2/{endpoint}/job-take-batch/{worker}?gpu=..&batch_size=N&job_in_progress=..
                                                                                list of jobs or 204
    POST {base}/v2/{endpoint}/job-stream/{worker}/{job}?gpu=..&isStream=false   body: {"output": chunk}
    POST {base}/v2/{endpoint}/job-done/{worker}/{job}?gpu=..&isStream=true|false
                                                 body: {"output": [...]} or {"error": "..."}
    GET  {base}/v2/{endpoint}/job-stop/{worker}?gpu=..   long-poll: {"jobsToStop": [ids]} or 204
    GET  {base}/v2/{endpoint}/ping/{worker}?gpu=..&job_id=..&runpod_version=..

and, for clients, RunPod's job API (the answers carry ``output`` or ``error`` as the worker
posted them, so a client sees what it would see on RunPod):

    POST {base}/v2/{endpoint}/run          body {"input": ...}  ->  {"id", "status": "IN_QUEUE"}
    POST {base}/v2/{endpoint}/runsync      body {"input": ...}  ->  the status, once the job ended
    GET  {base}/v2/{endpoint}/status/{job}  ->  {"id", "status", "output"? , "error"?}
    GET  {base}/v2/{endpoint}/stream/{job}  ->  {"id", "status", "stream": [{"output": chunk}, ...
                                                 posted since the last call], "error"?}

Post bodies are JSON sent as ``application/x-www-form-urlencoded``, as the SDK does.
The take and stop channels are long-polls: held up to ``hold_s`` while there is nothing
to hand out. Every take, chunk, result and ping is recorded with a ``time.monotonic()``
timestamp. The server runs in its own thread, so tests call it synchronously::

    emulator = RunPodEmulator()
    base_url = emulator.start()                 # 127.0.0.1, a free port
    env = emulator.worker_env()                 # RUNPOD_WEBHOOK_* for `python handler.py`
    job_id = emulator.submit({"prompt": "Živjo"})
    record = emulator.wait_result(job_id, timeout=60)
    emulator.stop_job(job_id)                   # the platform's cancel / timeout
    emulator.close()

``python -m tests.harness.runpod_emulator --port 8080`` serves it for manual use; it prints the
worker environment, and clients use the job API above.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from aiohttp import web

ENDPOINT_ID = "gams-emulated"
WORKER_ID = "emulated-worker-0"
RUNSYNC_WAIT_S = 90.0  # how long /runsync waits for the job to end before answering its status


@dataclasses.dataclass
class JobRecord:
    """One submitted job and everything the worker posted about it."""

    id: str
    input: Any
    submitted_at: float
    taken_at: List[float] = dataclasses.field(default_factory=list)  # one entry per hand-out
    chunks: List[Tuple[float, Any]] = dataclasses.field(default_factory=list)  # (time, {"output": chunk})
    results: List[Tuple[float, Any]] = dataclasses.field(default_factory=list)  # (time, final body)
    raw_input: Optional[str] = None  # the input as JSON text, handed out as it is (see submit_raw)
    stop_requested_at: Optional[float] = None
    stop_delivered_at: Optional[float] = None  # when the stop poll handed the stop to the worker
    chunks_read: int = 0  # chunks a client has read through /stream
    done: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    @property
    def result(self) -> Any:
        """The first final post's body (``{"output": [...]}`` or ``{"error": "..."}``)."""
        return self.results[0][1] if self.results else None

    @property
    def status(self) -> str:
        """The job's status as RunPod's job API names it."""
        if self.results:
            return "FAILED" if "error" in self.result else "COMPLETED"
        if self.stop_requested_at is not None:
            return "CANCELLED"
        return "IN_PROGRESS" if self.taken_at else "IN_QUEUE"

    @property
    def chunk_outputs(self) -> List[Any]:
        return [body.get("output") for _, body in self.chunks]


class RunPodEmulator:
    """RunPod's job queue and worker API on 127.0.0.1, recording all traffic."""

    def __init__(self, hold_s: float = 1.0, stop_hold_s: float = 10.0, endpoint_id: str = ENDPOINT_ID,
                 worker_id: str = WORKER_ID):
        # How long an empty take / stop poll is held open. The SDK sleeps 1 s after an empty stop
        # poll, so a short stop hold would delay stops by up to 1 s; a long one delays the
        # worker's exit after SIGTERM by up to stop_hold_s (the SDK waits for the poll to end).
        self.hold_s = hold_s
        self.stop_hold_s = stop_hold_s
        self.endpoint_id = endpoint_id
        self.worker_id = worker_id
        self.jobs: Dict[str, JobRecord] = {}
        self.takes: List[Tuple[float, Dict[str, str]]] = []  # (time, query) of every take request
        self.pings: List[Tuple[float, Dict[str, str]]] = []
        self.stream_failures_left = 0  # answer this many stream posts with HTTP 500
        self._posts_held_until_stop: set = set()  # job ids (see hold_stream_posts)
        self.failed_stream_posts = 0
        self.base_url: Optional[str] = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._queue: Deque[str] = deque()
        self._stops: Deque[str] = deque()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Optional[web.AppRunner] = None
        self._wakeup: Optional[asyncio.Event] = None

    # ----------------------------------------------------------------- control
    def start(self, port: int = 0) -> str:
        """Serve on 127.0.0.1:``port`` (0: a free one) in a background thread; return the base URL."""
        started = threading.Event()
        errors: List[BaseException] = []

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start_site(port))
            except BaseException as exc:  # surface bind errors to start()
                errors.append(exc)
                started.set()
                return
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="runpod-emulator", daemon=True)
        self._thread.start()
        started.wait(30)
        if errors:
            raise errors[0]
        return self.base_url

    def close(self) -> None:
        if self._loop is None:
            return
        # cleanup() waits for open long-polls to end
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(self.stop_hold_s + 30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def worker_env(self) -> Dict[str, str]:
        """The variables RunPod gives a serverless worker, pointing at this emulator."""
        api = f"{self.base_url}/v2/{self.endpoint_id}"
        return {
            # The SDK replaces $ID in the take URL with the worker id, and $RUNPOD_POD_ID / $ID
            # in the post URLs with the worker id / job id; it appends "&..." query parameters.
            "RUNPOD_WEBHOOK_GET_JOB": f"{api}/job-take/$ID?gpu=emulated",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{api}/job-done/$RUNPOD_POD_ID/$ID?gpu=emulated",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{api}/job-stream/$RUNPOD_POD_ID/$ID?gpu=emulated",
            "RUNPOD_WEBHOOK_PING": f"{api}/ping/$RUNPOD_POD_ID?gpu=emulated",
            "RUNPOD_POD_ID": self.worker_id,
            "RUNPOD_AI_API_KEY": "emulated-api-key",  # without it the SDK sends no pings
            "RUNPOD_PING_INTERVAL": "1000",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",  # the checks dial out and exit when offline
        }

    def submit(self, job_input: Any, job_id: Optional[str] = None) -> str:
        """Queue a job with this ``input``; return its id."""
        return self._enqueue([(job_input, job_id)])[0].id

    def submit_raw(self, input_json: str, job_id: Optional[str] = None) -> str:
        """Queue a job whose ``input`` is this JSON text, handed out exactly as written: text that
        Python's own JSON encoder could not write (nested thousands of levels deep) or invalid JSON."""
        return self._enqueue([(input_json, job_id)], raw=True)[0].id

    def submit_many(self, inputs: List[Any]) -> List[JobRecord]:
        """Queue all these jobs at one instant, waking the worker's take once."""
        return self._enqueue([(job_input, None) for job_input in inputs])

    def _enqueue(self, jobs: List[Tuple[Any, Optional[str]]], raw: bool = False) -> List[JobRecord]:
        records = []
        with self._lock:
            now = time.monotonic()
            for job_input, job_id in jobs:
                job_id = job_id or f"job-{next(self._ids):05d}"
                if job_id in self.jobs:
                    raise ValueError(f"job id {job_id} already submitted")
                record = JobRecord(job_id, job_input, now, raw_input=job_input if raw else None)
                self.jobs[job_id] = record
                self._queue.append(job_id)
                records.append(record)
        self._wake()
        return records

    def stop_job(self, job_id: str) -> None:
        """Ask the worker to stop this job, as RunPod does on cancel or timeout."""
        with self._lock:
            self.jobs[job_id].stop_requested_at = time.monotonic()
            self._stops.append(job_id)
        self._wake()

    def fail_stream_posts(self, count: int) -> None:
        """Answer the next ``count`` stream posts with HTTP 500."""
        with self._lock:
            self.stream_failures_left = count

    def hold_stream_posts(self, job_id: str) -> None:
        """Answer this job's stream posts only once its stop has been handed to the worker (the stop
        then finds the job's task waiting on a post, as over a slow link to RunPod) or once
        ``release_stream_posts`` is called: till then the job stays in flight, its final result
        waiting behind its chunks, however fast the engine is."""
        with self._lock:
            self._posts_held_until_stop.add(job_id)

    def release_stream_posts(self, job_id: str) -> None:
        with self._lock:
            self._posts_held_until_stop.discard(job_id)
        self._wake()

    def wait_result(self, job_id: str, timeout: float) -> JobRecord:
        """Wait for the job's final post; raise TimeoutError naming the job otherwise."""
        record = self.jobs[job_id]
        if not record.done.wait(timeout):
            raise TimeoutError(f"no result for {job_id} within {timeout} s (chunks: {len(record.chunks)})")
        return record

    def wait_chunks(self, job_id: str, count: int, timeout: float) -> JobRecord:
        """Wait until the job has posted at least ``count`` stream chunks."""
        record = self.jobs[job_id]
        deadline = time.monotonic() + timeout
        while len(record.chunks) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{job_id} posted {len(record.chunks)} chunks, not {count}, in {timeout} s")
            time.sleep(0.02)
        return record

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    # ----------------------------------------------------------------- server
    async def _start_site(self, port: int) -> None:
        self._wakeup = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        prefix = "/v2/{endpoint}"
        app.router.add_get(prefix + "/job-take/{worker}", self._take_one)
        app.router.add_get(prefix + "/job-take-batch/{worker}", self._take_batch)
        app.router.add_post(prefix + "/job-stream/{worker}/{job}", self._stream)
        app.router.add_post(prefix + "/job-done/{worker}/{job}", self._done)
        app.router.add_get(prefix + "/job-stop/{worker}", self._stop_poll)
        app.router.add_get(prefix + "/ping/{worker}", self._ping)
        app.router.add_post(prefix + "/run", self._client_run)
        app.router.add_post(prefix + "/runsync", self._client_runsync)
        app.router.add_get(prefix + "/status/{job}", self._client_status)
        app.router.add_get(prefix + "/stream/{job}", self._client_stream)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        bound_port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{bound_port}"

    def _wake(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._pulse)

    def _pulse(self) -> None:
        # Wake every waiting long-poll; each re-checks its own condition.
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def _hold_until(self, ready, hold_s: float) -> bool:
        """Wait up to ``hold_s`` for ``ready()`` to turn true."""
        deadline = time.monotonic() + hold_s
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                return ready()
        return True

    def _hand_out(self, limit: int) -> List[str]:
        """The next jobs, each as its JSON text ``{"id", "input"}``."""
        jobs = []
        with self._lock:
            now = time.monotonic()
            while self._queue and len(jobs) < limit:
                record = self.jobs[self._queue.popleft()]
                record.taken_at.append(now)
                if record.raw_input is None:
                    jobs.append(json.dumps({"id": record.id, "input": record.input}))
                else:
                    jobs.append(f'{{"id": {json.dumps(record.id)}, "input": {record.raw_input}}}')
        return jobs

    async def _take_one(self, request: web.Request) -> web.Response:
        self.takes.append((time.monotonic(), dict(request.query)))
        await self._hold_until(lambda: bool(self._queue), self.hold_s)
        jobs = self._hand_out(1)
        return web.Response(text=jobs[0], content_type="application/json") if jobs else web.Response(status=204)

    async def _take_batch(self, request: web.Request) -> web.Response:
        self.takes.append((time.monotonic(), dict(request.query)))
        try:
            batch_size = int(request.query["batch_size"])
        except (KeyError, ValueError):
            return web.Response(status=400, text="batch_size missing")
        await self._hold_until(lambda: bool(self._queue), self.hold_s)
        jobs = self._hand_out(batch_size)
        return web.Response(text=f"[{', '.join(jobs)}]", content_type="application/json") if jobs \
            else web.Response(status=204)

    async def _stream(self, request: web.Request) -> web.Response:
        body = json.loads(await request.text())
        with self._lock:
            if self.stream_failures_left > 0:
                self.stream_failures_left -= 1
                self.failed_stream_posts += 1
                return web.Response(status=500, text="emulated failure")
            record = self.jobs.get(request.match_info["job"])
            if record is None:
                return web.Response(status=404, text="unknown job")
            record.chunks.append((time.monotonic(), body))
            held = record.id in self._posts_held_until_stop
        self._pulse()  # wakes /stream calls waiting for this job
        if held:
            await self._hold_until(
                lambda: record.stop_delivered_at is not None or record.id not in self._posts_held_until_stop,
                self.stop_hold_s + 60)
            if record.stop_delivered_at is not None:
                await asyncio.sleep(1.0)  # answer only once the stop has surely reached the worker
        return web.Response(text="ok")

    async def _done(self, request: web.Request) -> web.Response:
        body = json.loads(await request.text())
        record = self.jobs.get(request.match_info["job"])
        if record is None:
            return web.Response(status=404, text="unknown job")
        with self._lock:
            record.results.append((time.monotonic(), body))
        record.done.set()
        self._pulse()  # wakes /runsync and /stream calls waiting for this job
        return web.Response(text="ok")

    async def _stop_poll(self, request: web.Request) -> web.Response:
        await self._hold_until(lambda: bool(self._stops), self.stop_hold_s)
        with self._lock:
            job_ids = list(self._stops)
            self._stops.clear()
            for job_id in job_ids:
                self.jobs[job_id].stop_delivered_at = time.monotonic()
        if not job_ids:
            return web.Response(status=204)
        self._pulse()  # wakes the posts held until their job's stop was handed over
        return web.json_response({"jobsToStop": job_ids})

    async def _ping(self, request: web.Request) -> web.Response:
        self.pings.append((time.monotonic(), dict(request.query)))
        return web.Response(text="ok")

    # ----------------------------------------------------------------- client job API
    def job_status(self, job_id: str) -> Dict[str, Any]:
        """What RunPod's /status answers for this job."""
        record = self.jobs[job_id]
        answer: Dict[str, Any] = {"id": record.id, "status": record.status}
        if record.result is not None:
            key = "error" if "error" in record.result else "output"
            answer[key] = record.result.get(key)
        return answer

    async def _client_job(self, request: web.Request) -> str:
        body = await request.json()
        if not isinstance(body, dict) or "input" not in body:
            raise web.HTTPBadRequest(text="the body must be {\"input\": ...}")
        return self.submit(body["input"])

    async def _client_run(self, request: web.Request) -> web.Response:
        return web.json_response({"id": await self._client_job(request), "status": "IN_QUEUE"})

    async def _client_runsync(self, request: web.Request) -> web.Response:
        record = self.jobs[await self._client_job(request)]
        await self._hold_until(record.done.is_set, RUNSYNC_WAIT_S)
        return web.json_response(self.job_status(record.id))

    async def _client_status(self, request: web.Request) -> web.Response:
        if request.match_info["job"] not in self.jobs:
            return web.Response(status=404, text="unknown job")
        return web.json_response(self.job_status(request.match_info["job"]))

    async def _client_stream(self, request: web.Request) -> web.Response:
        record = self.jobs.get(request.match_info["job"])
        if record is None:
            return web.Response(status=404, text="unknown job")
        await self._hold_until(lambda: len(record.chunks) > record.chunks_read or record.done.is_set(), self.hold_s)
        with self._lock:
            chunks = record.chunks[record.chunks_read:]
            record.chunks_read += len(chunks)
        answer = self.job_status(record.id)
        answer.pop("output", None)
        answer["stream"] = [{"output": body.get("output")} for _, body in chunks]
        return web.json_response(answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    emulator = RunPodEmulator()
    base_url = emulator.start(args.port)
    print(f"RunPod emulator on {base_url}; start the worker with:")
    print(" ".join(f"{k}='{v}'" for k, v in emulator.worker_env().items()) + " python handler.py")
    api = f"{base_url}/v2/{emulator.endpoint_id}"
    print(f"a job: curl -s {api}/runsync -d '{{\"input\": {{\"prompt\": \"Živjo\"}}}}'; its stream: {api}/stream/<id>")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        emulator.close()


if __name__ == "__main__":
    main()
