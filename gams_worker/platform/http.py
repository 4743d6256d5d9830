"""A load-balancing endpoint's HTTP server on PORT: ``/ping`` from the process's first second (204 while
starting, 200 ready, 503 once the engine is dead or the worker stops), and the OpenAI routes of the queue's
OpenAI jobs on the same request path (jobs/dialects.py), streamed as SSE. Whatever a client sends gets an
answer, at worst an OpenAI-shaped JSON error; SIGTERM lets the requests in flight finish."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import signal
import threading
from http import HTTPStatus
from typing import Any, AsyncIterator, Dict, Optional

import uvloop
from aiohttp import web

from gams_worker.config import WorkerConfig
from gams_worker.errors import sendable_json
from gams_worker.jobs.openai_input import DETOKENIZE_ROUTE, MODELS_ROUTE, TOKENIZE_ROUTE
from gams_worker.jobs.openai import CHECKED_INLINE_SIZE, ROUTES

log = logging.getLogger(__name__)

# vllm serve's paths of the tokenizer routes, beside the /v1/ ones the queue's OpenAI jobs name.
PATHS = {**{route: route for route in ROUTES}, "/tokenize": TOKENIZE_ROUTE, "/detokenize": DETOKENIZE_ROUTE}
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
               413: "RequestTooLarge", 503: "ServiceUnavailable", 504: "TimeoutError"}


def error_object(status: int, message: str) -> Dict[str, Any]:
    """An OpenAI-shaped error, as vLLM's server writes one."""
    return {"message": message, "type": ERROR_TYPES.get(status, "InternalServerError"), "param": None, "code": status}


def error_response(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=sendable_json({"error": error_object(status, message)}),
                        content_type="application/json")


def parse_body(body: bytes) -> Any:
    """A request body's JSON; ValueError (or RecursionError, nested too deep) when it is none."""
    return json.loads(body.decode("utf-8"))


class HttpEndpoint:
    """The server, in a thread of its own from construction on; ``serve(worker)`` hands it the started
    worker and returns 0 once SIGTERM's drain is done."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.worker: Any = None  # set when the engine is ready
        self.draining = False
        self._stopping = False
        self.in_flight = 0
        self._ids = itertools.count(1)
        self._loop = uvloop.new_event_loop()  # vllm serve's loop: vLLM requires uvloop
        self._drained = threading.Event()
        self._bound = threading.Event()
        self._failure: Optional[BaseException] = None
        threading.Thread(target=self._run, name="http-endpoint", daemon=True).start()
        self._bound.wait()
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._runner = self._loop.run_until_complete(self._start())
        except BaseException as exc:  # the port is taken: the worker cannot serve
            self._failure = exc
        self._bound.set()
        if self._failure is None:
            self._loop.run_forever()

    async def _start(self) -> web.AppRunner:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)  # a disconnect cancels
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", self.config.port).start()
        health_port = self.config.port_health or self.config.port
        if health_port != self.config.port:
            health = web.Application()
            health.router.add_get(self.config.health_check_path, self._ping)
            health_runner = web.AppRunner(health, access_log=None)
            await health_runner.setup()
            await web.TCPSite(health_runner, "0.0.0.0", health_port).start()
        return runner

    def serve(self, worker: Any) -> int:
        """Serve requests on ``worker`` until SIGTERM and the drain after it; the exit status."""
        self.worker = worker
        signal.signal(signal.SIGTERM, lambda signum, frame: self._loop.call_soon_threadsafe(self._drain))
        log.info("HTTP endpoint ready on port %d (%s on port %d): %s", self.config.port, self.config.health_check_path,
                 self.config.port_health or self.config.port, ", ".join(PATHS))
        while not self._drained.wait(1.0):  # a timed wait lets the main thread run the signal handler
            pass
        return 0

    def _drain(self) -> None:
        if not self.draining:
            log.info("SIGTERM: taking no more requests; %d in flight finish first", self.in_flight)
            self.draining = True
        self._stop_when_idle()

    def _stop_when_idle(self) -> None:
        if self.draining and self.in_flight == 0 and not self._stopping:
            self._stopping = True
            self._loop.create_task(self._stop())

    async def _stop(self) -> None:
        await self._runner.cleanup()
        self._drained.set()

    def health(self) -> int:
        if self.draining or (self.worker is not None and self.worker.engine.errored):
            return HTTPStatus.SERVICE_UNAVAILABLE
        return HTTPStatus.NO_CONTENT if self.worker is None else HTTPStatus.OK

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health())

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path == self.config.health_check_path and request.method == "GET":
            return await self._ping(request)
        route = PATHS.get(request.path)
        if route is None:
            return error_response(404, f"no route {request.path}; served: {', '.join(PATHS)}")
        if request.method != ("GET" if route == MODELS_ROUTE else "POST"):
            return error_response(405, f"{request.method} is not served on {request.path}")
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        self.in_flight += 1
        try:
            return await self._answer(request, route)
        finally:
            self.in_flight -= 1
            self._stop_when_idle()

    def _refusal(self, request: web.Request) -> Optional[web.Response]:
        if self.worker is None or self.draining:
            return error_response(503, "the worker is " + ("stopping" if self.draining else "starting"))
        key = self.config.api_key
        given = request.headers.get("Authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return error_response(401, "a wrong or missing API key: send the header Authorization: Bearer <key>")
        return None

    async def _answer(self, request: web.Request, route: str) -> web.StreamResponse:
        job_input: Dict[str, Any] = {"openai_route": route}
        if route != MODELS_ROUTE:
            try:
                body = await request.read()
                parse = asyncio.to_thread if len(body) > CHECKED_INLINE_SIZE else _now
                job_input["openai_input"] = await parse(parse_body, body)
            except web.HTTPRequestEntityTooLarge:
                return error_response(413, f"the body is over MAX_BODY_BYTES ({self.config.max_body_bytes} bytes)")
            except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested too deep
                return error_response(400, f"the body is not JSON: {type(exc).__name__}: {exc}"[:500])
        outputs = self.worker.run({"id": f"http-{next(self._ids)}", "input": job_input})
        try:
            return await self._respond(request, outputs)
        finally:
            await outputs.aclose()  # a client gone: its engine request is aborted now

    async def _respond(self, request: web.Request, outputs: AsyncIterator[Any]) -> web.StreamResponse:
        """The job's one answer as JSON, or its stream as SSE; the deadline ends either with an error."""
        stream: Optional[web.StreamResponse] = None
        try:
            async with asyncio.timeout(self.config.request_timeout_s or None):
                async for output in outputs:
                    if isinstance(output, str):
                        stream = stream or await _open_stream(request)
                        await stream.write(output.encode())
                    elif stream is None:
                        return _json_answer(output)
                    else:  # a stream that failed
                        await stream.write(_error_event(_job_error(output) or error_object(500, str(output))))
        except TimeoutError:
            message = f"the request ran past REQUEST_TIMEOUT_S ({self.config.request_timeout_s:g} s)"
            if stream is None:
                return error_response(504, message)
            await stream.write(_error_event(error_object(504, message)))
        except ConnectionResetError:  # the client left mid-stream
            return stream
        await stream.write_eof()
        return stream


async def _now(function: Any, *args: Any) -> Any:
    return function(*args)


async def _open_stream(request: web.Request) -> web.StreamResponse:
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await stream.prepare(request)
    return stream


def _job_error(output: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The error object of a failed job's output ({"error": "<JSON text>"}), else None; the job's
    name of the whole body (``openai_input``) is no parameter over HTTP."""
    error = output.get("error")
    if not isinstance(error, str):
        return None
    error = json.loads(error)
    if error.get("param") == "openai_input":
        error["param"] = None
    return error


def _json_answer(output: Dict[str, Any]) -> web.Response:
    error = _job_error(output)
    if error is None:
        return web.Response(text=sendable_json(output), content_type="application/json")
    code = error.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return web.Response(status=status, text=sendable_json({"error": error}), content_type="application/json")


def _error_event(error: Dict[str, Any]) -> bytes:
    """A failed stream's last events: its error, then the end vLLM's own streams write."""
    return f"data: {sendable_json({'error': error})}\n\ndata: [DONE]\n\n".encode()
