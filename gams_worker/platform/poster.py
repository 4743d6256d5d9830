"""The stream and result POSTs of each job in place of the runpod SDK's (runpod 1.12.0 ``rp_job.handle_job``):
the same bytes to the same URLs with the SDK's retries, each output serialised once; an output that cannot be
sent and a POST that fails on the connection no longer lose the job (MAINTAINERS.md, "Errors that always post")."""

from __future__ import annotations

import asyncio
import inspect
import traceback
from typing import Any, Dict, List, Mapping, Optional

import aiohttp
from runpod.serverless.modules import rp_scale
from yarl import URL

from gams_worker.errors import sendable_json, utf8_json
from gams_worker.jobs.dialects import worker_error_output

log = rp_scale.log  # the SDK's logger: its format, its RUNPOD_LOG_LEVEL

ATTEMPTS = 3  # the SDK's FibonacciRetry(attempts=3)
RETRY_WAITS_S = (2.0, 3.0)  # FibonacciRetry's waits after the first and the second failure
# The SDK's headers on every post (its session adds Authorization and User-Agent).
POST_HEADERS = {"charset": "utf-8", "Content-Type": "application/x-www-form-urlencoded"}


def encode_error(error: Any) -> bytes:
    """A job's error result, sent whatever its text holds."""
    return sendable_json({"error": str(error)}).encode("utf-8")


class ResultPoster:
    def __init__(self, stream_url: str, done_url: str, retry_waits_s=RETRY_WAITS_S):
        # The SDK's URL templates (rp_http.JOB_STREAM_URL / JOB_DONE_URL), ``$ID`` standing for the job id.
        self.stream_url = stream_url
        self.done_url = done_url
        self.retry_waits_s = retry_waits_s

    @staticmethod
    def serves(config: Mapping[str, Any]) -> bool:
        """Whether this path implements every option the SDK config ``config`` uses."""
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
                    body = utf8_json(output)  # as the SDK serialises it, in UTF-8
                except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
                    problem = f"{type(exc).__name__}: {exc}"
                    log.error(f"Output cannot be sent as UTF-8 JSON: {problem}", job_id)
                    return encode_error(worker_error_output(
                        job.get("input"), f"the worker produced an output it cannot send as UTF-8 JSON ({problem})"
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
