"""The stream and result POSTs of each job, in place of the runpod SDK's (runpod 1.12.0 ``rp_job.handle_job``,
``run_job_generator``, ``rp_http.stream_result`` / ``send_result`` / ``_transmit``).

Per chunk the SDK formats two debug messages of the whole output (even when DEBUG is off),
builds a new aiohttp_retry ``RetryClient`` and ``FibonacciRetry``, sets the job's id on the
session's shared default headers, and serialises the output once for the chunk and once more
inside the final aggregate. At 512 streams on an H200 that path was ~40 % of the worker's main
process. This module sends the same bytes to the same URLs, through the SDK's one keep-alive
session (the one its job takes use), with each output serialised once.

Kept from the SDK, as a client of RunPod sees it:

- every output the handler yields is POSTed as ``{"output": ...}`` to the stream URL
  (``&isStream=false``), one at a time and in order: the next output is taken from the handler
  only once the POST before it is answered;
- then the result ``{"output": [every output]}`` (``return_aggregate_stream``; ``{"output": []}``
  without it) goes to the done URL (``&isStream=true``), after the last chunk;
- an output ``{"error": ...}`` ends the job: it is not streamed, the result is
  ``{"error": str(...)}``; an exception out of the handler ends it with the SDK's
  ``{"error": "handler: ... \\ntraceback: ..."}``;
- a POST answered 5xx is retried: 3 attempts, 2 s then 3 s apart (the SDK's
  ``FibonacciRetry(attempts=3)``); one still failing, or answered 4xx, is logged with the SDK's
  message and the job goes on (a chunk lost that way is still in the result's aggregate);
- a stopped job (its task cancelled) posts nothing more; its "Finished." line is logged as the SDK's.

Changed, where the SDK lost the job:

- an output that cannot be sent as UTF-8 JSON (a lone surrogate in a string, an object JSON
  cannot encode) ends the job with a ``worker_error`` result in its dialect naming the cause. The
  SDK raised out of its loop there and posted nothing, so RunPod waited for the job until its timeout;
- a POST that fails on the connection (a keep-alive connection the server closed, a reset) is
  retried like a 5xx; the SDK dropped it, and with it the job's result.

``JobLoop`` (gams_worker/platform/job_loop.py) runs jobs through ``ResultPoster.run_job`` when the
handler is an async generator and no SDK option this path does not implement (``refresh_worker``,
``--rp_debugger``) is set; otherwise through the SDK's own ``handle_job``. Both sit behind the
same SDK-version guard (gams_worker/platform/sdk_version.py).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import traceback
from typing import Any, Dict, List, Mapping, Optional

import aiohttp
from runpod.serverless.modules import rp_scale
from yarl import URL

from gams_worker.jobs.route import worker_error_output

log = rp_scale.log  # the SDK's logger: its format, its RUNPOD_LOG_LEVEL

ATTEMPTS = 3  # the SDK's FibonacciRetry(attempts=3)
RETRY_WAITS_S = (2.0, 3.0)  # FibonacciRetry's waits after the first and the second failure
# The SDK's headers on every post (its session adds Authorization and User-Agent).
POST_HEADERS = {"charset": "utf-8", "Content-Type": "application/x-www-form-urlencoded"}


class UnsendableOutput(Exception):
    """An output that cannot be sent as UTF-8 JSON."""


def encode(value: Any) -> bytes:
    """``value`` as the SDK serialises it (``json.dumps(..., ensure_ascii=False)``), in UTF-8."""
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise UnsendableOutput(f"{type(exc).__name__}: {exc}") from None


def encode_error(error: Any) -> bytes:
    """A job's error result; one whose text holds a lone surrogate is sent with it escaped, so
    that the job still ends with its error."""
    body = {"error": str(error)}
    try:
        return encode(body)
    except UnsendableOutput:
        return json.dumps(body).encode("ascii")


class ResultPoster:
    """Runs a job's handler and posts its outputs and result (see the module docstring)."""

    def __init__(self, stream_url: str, done_url: str, retry_waits_s=RETRY_WAITS_S):
        # The SDK's URL templates (rp_http.JOB_STREAM_URL / JOB_DONE_URL): the worker id filled
        # in, ``$ID`` standing for the job id.
        self.stream_url = stream_url
        self.done_url = done_url
        self.retry_waits_s = retry_waits_s

    @staticmethod
    def serves(config: Mapping[str, Any]) -> bool:
        """Whether this path implements every option of the SDK config ``config`` uses."""
        return (inspect.isasyncgenfunction(config.get("handler"))
                and not config.get("refresh_worker", False)
                and not config.get("rp_args", {}).get("rp_debugger", False))

    async def run_job(self, session: aiohttp.ClientSession, config: Dict[str, Any], job: Dict[str, Any]) -> None:
        """The SDK's ``rp_job.handle_job(session, config, job)`` for an async generator handler."""
        job_id = job["id"]
        # Parsed once per job, not per post.
        stream_url = URL(self.stream_url.replace("$ID", job_id) + "&isStream=false", encoded=False)
        done_url = URL(self.done_url.replace("$ID", job_id) + "&isStream=true", encoded=False)
        headers = {**POST_HEADERS, "X-Request-ID": job_id}
        keep = config.get("return_aggregate_stream", False)
        sent: List[bytes] = []  # each output's JSON, for the aggregate
        outputs = config["handler"](job)
        try:
            result = await self._stream(session, outputs, job, stream_url, headers, sent if keep else None)
        finally:
            await outputs.aclose()  # at once, also when the job was stopped or failed
        if result is None:
            result = b'{"output": [' + b", ".join(sent) + b"]}"
        await self._post(session, done_url, result, headers, job_id, "Failed to return job results.")
        log.info("Finished.", job_id)

    async def _stream(self, session: aiohttp.ClientSession, outputs: Any, job: Dict[str, Any], url: URL,
                      headers: Dict[str, str], sent: Optional[List[bytes]]) -> Optional[bytes]:
        """POST each output in turn; None when all went, else the job's error result."""
        job_id = job["id"]
        try:
            async for output in outputs:
                if isinstance(output, dict) and output.get("error"):
                    return encode_error(output["error"])
                try:
                    body = encode(output)
                except UnsendableOutput as exc:
                    log.error(f"Output cannot be sent as UTF-8 JSON: {exc}", job_id)
                    return encode_error(worker_error_output(
                        job.get("input"), f"the worker produced an output it cannot send as UTF-8 JSON ({exc})"
                    )["error"])
                if sent is not None:
                    sent.append(body)
                await self._post(session, url, b'{"output": ' + body + b"}", headers, job_id,
                                 "Failed to return job results.")
        except Exception as exc:  # the handler raised: the SDK's run_job_generator error
            log.error(exc, job_id)
            return encode_error(f"handler: {exc} \ntraceback: {traceback.format_exc()}")
        return None

    async def _post(self, session: aiohttp.ClientSession, url: URL, body: bytes, headers: Dict[str, str],
                    job_id: str, failure: str) -> bool:
        """POST ``body``, retrying 5xx answers and connection failures; log a final failure. True if answered 2xx."""
        for attempt in range(ATTEMPTS):
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status < 400:
                        return True
                    problem = f"{response.status}, message='{response.reason}', url='{url}'"
                    if response.status < 500:
                        break  # the SDK retries server errors only
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < ATTEMPTS - 1:
                await asyncio.sleep(self.retry_waits_s[attempt])
        log.error(f"{failure} | {problem}", job_id)
        return False
