"""RunPod's OpenAI surface, emulated on top of tests/harness/runpod_emulator.py.

RunPod answers ``{base}/v2/{endpoint}/openai/v1/...`` by queueing a job
``{"openai_route": "/v1/...", "openai_input": <request body>}`` and relaying what the
worker yields:

    POST .../openai/v1/chat/completions, .../completions, .../responses, .../tokenize, any other route
        stream true:   the worker's stream chunks (strings of SSE events) written as they
                       arrive to a ``text/event-stream`` response
        stream false:  the job's one output, as a JSON response
    GET  .../openai/v1/models    a job with the route only; its output as JSON

A failed job (its error is the JSON text of OpenAI's error object, gams_worker/errors.py)
is answered with ``{"error": <that object>}`` and its ``code`` as HTTP status, so the
openai client raises the matching class (400 BadRequestError, 404 NotFoundError...).
RunPod does not document that mapping (worker-vllm issue #57 saw HTTP 200 with the error
in the body); this emulator takes the status from the worker's own error.

    proxy = OpenAIProxy(emulator)
    client = openai.OpenAI(base_url=proxy.start(), api_key="x", max_retries=0)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Dict, List, Optional

from aiohttp import web

from tests.harness.runpod_emulator import RunPodEmulator

POLL_S = 0.005  # how often a waiting request looks for new chunks of its job


class OpenAIProxy:
    """An HTTP server beside the emulator: OpenAI calls in, emulator jobs out."""

    def __init__(self, emulator: RunPodEmulator, job_timeout_s: float = 300):
        self.emulator = emulator
        self.job_timeout_s = job_timeout_s
        self.job_ids: List[str] = []  # every job this proxy submitted, in order
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._runner: Optional[web.AppRunner] = None
        self._thread: Optional[threading.Thread] = None
        self.base_url: Optional[str] = None

    def start(self) -> str:
        """Serve on a free 127.0.0.1 port; return the openai client's ``base_url``."""
        started = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start_site())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="openai-proxy", daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("the OpenAI proxy did not start")
        return f"{self.base_url}/v2/{self.emulator.endpoint_id}/openai/v1"

    def close(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    async def _start_site(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        prefix = "/v2/{endpoint}/openai/v1"
        app.router.add_post(prefix + "/chat/completions", self._generate)
        app.router.add_post(prefix + "/completions", self._generate)
        app.router.add_post(prefix + "/{route:.+}", self._generate)  # the worker serves or refuses the rest
        app.router.add_get(prefix + "/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    # ----------------------------------------------------------------- routes
    async def _models(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["endpoint"] != self.emulator.endpoint_id:
            return _error_response(404, f"no endpoint {request.match_info['endpoint']}")
        return await self._relay_json(self._submit({"openai_route": "/v1/models"}))

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["endpoint"] != self.emulator.endpoint_id:
            return _error_response(404, f"no endpoint {request.match_info['endpoint']}")
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return _error_response(400, f"the body is not JSON: {exc}")
        route = "/v1" + request.path.split("/openai/v1", 1)[1]
        job_id = self._submit({"openai_route": route, "openai_input": body})
        if isinstance(body, dict) and body.get("stream") is True:
            return await self._relay_stream(job_id, request)
        return await self._relay_json(job_id)

    # ----------------------------------------------------------------- relaying
    def _submit(self, job_input: Dict[str, Any]) -> str:
        job_id = self.emulator.submit(job_input)
        self.job_ids.append(job_id)
        return job_id

    async def _wait(self, condition) -> None:
        deadline = time.monotonic() + self.job_timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise web.HTTPGatewayTimeout(text="the job did not finish in time")
            await asyncio.sleep(POLL_S)

    async def _relay_json(self, job_id: str) -> web.Response:
        record = self.emulator.jobs[job_id]
        await self._wait(record.done.is_set)
        if "error" in record.result:
            return _job_error_response(record.result["error"])
        outputs = record.result.get("output")
        if not isinstance(outputs, list) or len(outputs) != 1:
            return _error_response(500, f"expected one output from the worker, got {outputs!r}")
        return web.json_response(outputs[0])

    async def _relay_stream(self, job_id: str, request: web.Request) -> web.StreamResponse:
        record = self.emulator.jobs[job_id]
        # The status line goes out with the first chunk, so an early failure can still be a 4xx.
        await self._wait(lambda: record.chunks or record.done.is_set())
        if not record.chunks and "error" in record.result:
            return _job_error_response(record.result["error"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        sent = 0
        while True:
            chunks = record.chunk_outputs
            for chunk in chunks[sent:]:
                # Strings are SSE text; anything else (never expected) goes out as one event.
                text = chunk if isinstance(chunk, str) else f"data: {json.dumps(chunk)}\n\n"
                await response.write(text.encode("utf-8"))
            sent = len(chunks)
            if record.done.is_set() and len(record.chunks) == sent:
                break
            await asyncio.sleep(POLL_S)
        await response.write_eof()
        return response


def _job_error_response(error_text: Any) -> web.Response:
    """The HTTP answer to a failed job; its error is the JSON text of an OpenAI error object."""
    try:
        error = json.loads(error_text)
    except (TypeError, ValueError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("code"), int) and 400 <= error["code"] < 600:
        return web.json_response({"error": error}, status=error["code"])
    return _error_response(500, str(error_text))


def _error_response(status: int, message: str) -> web.Response:
    error = {"message": message, "type": "InternalServerError" if status >= 500 else "BadRequestError",
             "param": None, "code": status}
    return web.json_response({"error": error}, status=status)
