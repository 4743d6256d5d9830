"""CPU benchmark suite: four ways to serve the same streamed jobs with the tiny model on vLLM's CPU build.

    .venv/bin/python -m bench cpu [--tokens 256] [--concurrency 1 8 32] [--rounds 11]
                                  [--paths raw handler emulator proxy] [--out bench/results/cpu-suite.json]

Paths (every job: one of PROMPTS, greedy, ``ignore_eos``, ``--tokens`` output tokens, streamed):

(a) ``raw``: vLLM's ``AsyncLLM.generate`` in this process, DELTA outputs.
(b) ``handler``: ``handler.handler`` in this process, on the same engine as (a) (the worker
    from ``gams_worker.worker.start_worker``, as ``handler.py`` builds it).
(c) ``emulator``: ``python handler.py`` as a subprocess with the worker environment of
    ``tests/harness/runpod_emulator.py`` (RunPod's worker-facing job API on 127.0.0.1): the real runpod
    SDK job loop takes the jobs over HTTP and posts every chunk and the result back.
    ``MAX_CONCURRENCY=32``.
(d) ``proxy``: the design of RunPod's official worker-vllm (``bench/proxy_worker.py``): a vLLM
    OpenAI server subprocess and a handler that forwards each job to ``/v1/completions``
    (stream) over HTTP and yields the SSE text, under the real SDK loop against its own
    emulator, driven exactly like (c).

For (a) and (b) a job's time to first chunk (TTFC) runs from the start of the round to the
first output with text (a; the first output with tokens is recorded too: a token can end in
an incomplete UTF-8 character, whose text comes with a later one) or the first yielded chunk
(b). For (c) and (d) it runs from the job's submission to the emulator until the worker's first stream POST arrived there, and the
round's wall time from submission to the last result POST; completion tokens come from the
job's final output (``usage``). Each round submits ``c`` jobs at once (one queue insert, as
when ``c`` clients call at the same moment) to an idle worker that is long-polling for jobs,
a random 0-100 ms after its job-take request came in (the SDK's own job loop, which (d) runs,
looks at its queue every 100 ms, (c)'s starts a taken job at once: gams_worker/platform/job_loop.py; the offset spreads
arrivals over that cycle as real traffic does).

Layout: all three engines run at once and rounds alternate over the paths (the order rotates
every round), so drift on this shared machine hits every path alike. An idle engine (OpenAI
server, engine core, CPU worker) was measured at 0.14 CPU-seconds per 10 s, but for 1 s after
its last step vLLM's CPU worker busy-polls its shared-memory queue at 100 % of a core, and every
engine's worker is bound to core 0 (vLLM reserves core 1 of 2 for everything else). So each
round starts only once the other processes are quiet (``CpuMeter.settle``). Memory: each engine gets ``--gpu-memory-utilization``
(default 0.1, on CPU the share of the NUMA node's RAM for weights and KV cache) instead of the
tests' 0.2, which on this 24 GiB machine came to 4.8 GiB of RSS per engine; the KV cache still
holds far more than 32 × 512 tokens. All engines use the same setting, ``--max-model-len`` 512
and bf16.

This process freezes its garbage-collector heap after the start-ups, as vLLM's OpenAI server
does (d); ``handler.py`` (c) does not, so its full collections (0.1-0.4 s on this machine) count.

Cold start: the in-process engine's ``AsyncLLM.from_engine_args`` time, and for (c) and (d)
process start → first job served (one job submitted right after spawning), each started while
the other engines sit idle. Results go to ``--out`` as JSON (and a table to stdout); CPU time
per path and process group goes there too, to show where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import psutil

from bench.gpu_suite import percentile
from tests.harness.runpod_emulator import JobRecord, RunPodEmulator
from tests.harness.worker_process import free_port

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("raw", "handler", "emulator", "proxy")
LABELS = {"raw": "(a) raw AsyncLLM", "handler": "(b) handler in-process", "emulator": "(c) handler.py + SDK",
          "proxy": "(d) vllm serve + proxy"}
PROMPTS = ["Ljubljana", "Triglav je", "Slovenija meji", "Vreme bo jutri", "Kaj je glavno mesto Slovenije?",
           "Prešeren je napisal", "Čebelarstvo ima", "Language models can"]
TARGETS = {"handler_over_raw": 0.97, "emulator_over_raw": 0.90, "emulator_over_proxy": 1.2, "added_ttfc_p50_ms": 5.0}
START_TIMEOUT_S = 600
ROUND_TIMEOUT_S = 300


def job_input(i: int, tokens: int) -> Dict[str, Any]:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "stream": True,
            "sampling_params": {"max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}}


class Round:
    """One round of one path: ``c`` jobs at once."""

    def __init__(self, tokens: int, wall_s: float, ttfc_s: List[float], take_s: Optional[List[float]] = None,
                 posts: Optional[List[int]] = None, handler_ttft_s: Optional[List[float]] = None,
                 first_token_s: Optional[List[float]] = None):
        self.tokens = tokens
        self.wall_s = wall_s
        self.ttfc_s = ttfc_s
        self.take_s = take_s  # platform paths: submission -> job handed to the worker
        self.posts = posts  # platform paths: stream POSTs per job
        self.handler_ttft_s = handler_ttft_s  # (c): the job's own usage.time_to_first_token_s
        self.first_token_s = first_token_s  # (a): the first output with tokens, perhaps no text yet

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


# --------------------------------------------------------------------------- in-process paths
async def raw_round(engine, prompt_ids: List[List[int]], concurrency: int, tokens: int) -> Round:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    started = time.monotonic()

    async def one(i: int):
        count, first_token, first_text = 0, None, None
        ids = prompt_ids[i % len(prompt_ids)]
        async for output in engine.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
            n = sum(len(c.token_ids) for c in output.outputs)
            if n and first_token is None:
                first_token = time.monotonic() - started
            if first_text is None and any(c.text for c in output.outputs):
                first_text = time.monotonic() - started
            count += n
        if first_text is None:  # no text at all: the job's end is when a client would have seen it
            first_text = time.monotonic() - started
        return count, first_text, first_token

    runs = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return Round(sum(r[0] for r in runs), time.monotonic() - started, [r[1] for r in runs],
                 first_token_s=[r[2] for r in runs])


async def handler_round(concurrency: int, tokens: int) -> Round:
    import handler

    started = time.monotonic()

    async def one(i: int):
        first, last = None, None
        async for output in handler.handler({"id": f"bench-{uuid.uuid4().hex[:8]}", "input": job_input(i, tokens)}):
            if first is None:
                first = time.monotonic() - started
            last = output
        if "usage" not in last:
            raise RuntimeError(f"handler job failed: {last}")
        return last["usage"]["completion_tokens"], first

    runs = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return Round(sum(r[0] for r in runs), time.monotonic() - started, [r[1] for r in runs])


# --------------------------------------------------------------------------- platform paths
def usage_tokens_sdk(output: List[Any]) -> int:
    """Completion tokens of a job of this worker: the last chunk's usage."""
    return output[-1]["usage"]["completion_tokens"]


def usage_tokens_sse(output: List[Any]) -> int:
    """Completion tokens of a proxied job: the usage event of the SSE text (include_usage)."""
    for line in "".join(output).splitlines():
        if line.startswith("data: {") and '"usage"' in line:
            usage = json.loads(line[6:]).get("usage")
            if usage:
                return usage["completion_tokens"]
    raise RuntimeError("no usage event in the proxied stream")


class PlatformWorker:
    """A worker process under the real runpod SDK loop, fed by its own emulator."""

    def __init__(self, name: str, argv: List[str], env: Dict[str, str], log_dir: Path, concurrency: int,
                 count_tokens: Callable[[List[Any]], int]):
        self.name = name
        self.argv = argv
        self.env = env  # the whole environment, less the platform's variables
        self.log_path = log_dir / f"{name}.log"
        self.concurrency = concurrency
        self.count_tokens = count_tokens
        self.emulator = RunPodEmulator(hold_s=1.0, stop_hold_s=2.0)
        self.emulator.start()
        self.proc: Optional[subprocess.Popen] = None
        self.last_done = 0.0

    def worker_env(self) -> Dict[str, str]:
        return {**self.env, **self.emulator.worker_env(), "MAX_CONCURRENCY": str(self.concurrency)}

    async def cold_start(self, tokens: int) -> Dict[str, float]:
        """Spawn the process, submit one job at once, and time it until that job is served."""
        with open(self.log_path, "wb") as log:
            spawned = time.monotonic()
            # Own process group, same session: a new session is a new scheduler autogroup, and
            # it starved the emulator in this process for seconds (BENCHMARKS.md).
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.worker_env(), stdout=log,
                                         stderr=subprocess.STDOUT, process_group=0)
        record = self.emulator.submit_many([job_input(0, tokens)])[0]
        await self._wait([record], START_TIMEOUT_S)
        self.count_tokens(record.result["output"])
        return {"first_take_s": round(self.emulator.takes[0][0] - spawned, 2),
                "first_job_served_s": round(record.results[0][0] - spawned, 2)}

    async def round(self, concurrency: int, tokens: int, offset_s: float = 0.0) -> Round:
        await self._wait_idle()
        await asyncio.sleep(offset_s)
        records = self.emulator.submit_many([job_input(i, tokens) for i in range(concurrency)])
        await self._wait(records, ROUND_TIMEOUT_S)
        submitted = records[0].submitted_at
        self.last_done = max(r.results[0][0] for r in records)
        for r in records:
            if not r.chunks:
                raise RuntimeError(f"{self.name}: job {r.id} posted no stream chunk: {r.result}")
        return Round(sum(self.count_tokens(r.result["output"]) for r in records), self.last_done - submitted,
                     [r.chunks[0][0] - submitted for r in records], [r.taken_at[0] - submitted for r in records],
                     [len(r.chunks) for r in records],
                     [r.result["output"][-1]["usage"]["time_to_first_token_s"] for r in records]
                     if self.count_tokens is usage_tokens_sdk else None)

    async def _wait(self, records: List[JobRecord], timeout: float) -> None:
        await asyncio.to_thread(self._wait_blocking, records, timeout)
        for record in records:
            if "output" not in record.result:
                raise RuntimeError(f"{self.name}: job {record.id} failed: {record.result}")

    def _wait_blocking(self, records: List[JobRecord], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for record in records:
            while not record.done.wait(0.5):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}\n"
                                       + self.log_tail())
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: no result for {record.id} in {timeout} s; log: {self.log_path}")

    async def _wait_idle(self) -> None:
        """Until the worker asks for jobs with none in progress after the last round (so it is idle)."""
        deadline = time.monotonic() + 30
        while True:
            takes = list(self.emulator.takes)
            if any(t > self.last_done and q.get("job_in_progress") == "0" for t, q in takes[-3:]):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no idle job-take after the last round; log: {self.log_path}")
            await asyncio.sleep(0.02)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def process_groups(self) -> Dict[str, List[psutil.Process]]:
        """The worker process, and its descendants: engine processes apart from an HTTP server."""
        root = psutil.Process(self.proc.pid)
        groups: Dict[str, List[psutil.Process]] = {"worker": [root]}
        for child in root.children(recursive=True):
            cmd = " ".join(child.cmdline())
            if "api_server" in cmd:
                groups.setdefault("http_server", []).append(child)
            elif "resource_tracker" not in cmd:
                groups.setdefault("engine", []).append(child)
        return groups

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.emulator.close()


# --------------------------------------------------------------------------- CPU accounting
def cpu_seconds(processes: List[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


class CpuMeter:
    """CPU seconds per process group, read before and after each round."""

    def __init__(self):
        self.groups: Dict[str, List[psutil.Process]] = {}

    def add(self, prefix: str, groups: Dict[str, List[psutil.Process]]) -> None:
        for name, processes in groups.items():
            self.groups[f"{prefix}.{name}"] = processes

    def read(self) -> Dict[str, float]:
        return {name: cpu_seconds(processes) for name, processes in self.groups.items()}

    async def settle(self, quiet_s: float = 0.01, window_s: float = 0.1, limit_s: float = 5.0) -> float:
        """Wait until no process outside this one uses more than ``quiet_s`` CPU in ``window_s``.

        vLLM's engine processes busy-poll their shared-memory queues for 1 s after the last
        message (vllm/distributed/device_communicators/shm_broadcast.py, busy_loop_s), taking
        one core of this 2-core machine from whatever runs next.
        """
        started = time.monotonic()
        while time.monotonic() - started < limit_s:
            before = self.read()
            await asyncio.sleep(window_s)
            after = self.read()
            if sum(after[g] - before[g] for g in after if not g.endswith(".bench")) < quiet_s:
                break
        return time.monotonic() - started


def in_process_groups() -> Dict[str, List[psutil.Process]]:
    """This process (the in-process paths' front end and both emulators) and its engine's processes."""
    me = psutil.Process()
    engine = [c for c in me.children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
    return {"bench": [me], "engine": engine}


# --------------------------------------------------------------------------- the suite
async def run_suite(args, log_dir: Path, base_env: Dict[str, str]) -> Dict[str, Any]:
    import handler
    from builder import tiny_model
    from gams_worker.config import load_config
    from gams_worker.worker import setup_logging, start_worker
    from vllm.v1.engine.async_llm import AsyncLLM

    model = str(tiny_model.build())
    common = {"MODEL_NAME": model, "MAX_MODEL_LEN": str(args.max_model_len),
              "GPU_MEMORY_UTILIZATION": str(args.gpu_memory_utilization), "VLLM_NO_USAGE_STATS": "1",
              "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    # Subprocesses get the environment as it was before this process started its own worker
    # (which may set variables such as VLLM_CACHE_ROOT for itself), less the platform's.
    sub_env = {k: v for k, v in base_env.items() if not k.startswith("RUNPOD_")}
    sub_env.update(common)
    if args.sdk_log_level:
        sub_env["RUNPOD_LOG_LEVEL"] = args.sdk_log_level
    max_c = max(args.concurrency)
    cold: Dict[str, Any] = {}
    workers: Dict[str, PlatformWorker] = {}
    worker = None
    meter = CpuMeter()
    in_process = {"raw", "handler"} & set(args.paths)
    try:
        if in_process:
            # (a)/(b): one in-process worker; time vLLM's own engine construction inside it.
            init_times: List[float] = []
            original = AsyncLLM.from_engine_args

            def timed_from_engine_args(*a, **kw):
                started = time.monotonic()
                try:
                    return original(*a, **kw)
                finally:
                    init_times.append(time.monotonic() - started)

            AsyncLLM.from_engine_args = timed_from_engine_args
            try:
                config = load_config({**common, "LOG_LEVEL": "WARNING"})
                setup_logging(config)
                started = time.monotonic()
                worker = start_worker(config)
                cold["in_process_start_worker_s"] = round(time.monotonic() - started, 2)
            finally:
                AsyncLLM.from_engine_args = original
            cold["raw_engine_init_s"] = round(init_times[-1], 2)
            handler.worker = worker
            prompt_ids = [worker.tokenizer.encode(p) for p in PROMPTS]  # what the handler passes
            meter.add("in_process", in_process_groups())
            print(f"in-process engine: AsyncLLM.from_engine_args {cold['raw_engine_init_s']} s, "
                  f"start_worker {cold['in_process_start_worker_s']} s", flush=True)

        else:
            meter.add("in_process", {"bench": [psutil.Process()]})  # the emulators live here

        if "emulator" in args.paths:
            workers["emulator"] = PlatformWorker(
                "emulator", [sys.executable, "handler.py"], sub_env, log_dir, max_c, usage_tokens_sdk)
        if "proxy" in args.paths:
            workers["proxy"] = PlatformWorker(
                "proxy", [sys.executable, "-m", "bench.proxy_worker"],
                {**sub_env, "DTYPE": "bfloat16", "VLLM_PORT": str(free_port())}, log_dir, max_c, usage_tokens_sse)
        for name, w in workers.items():  # one at a time, the others idle
            await meter.settle()
            cold[name] = await w.cold_start(args.tokens)
            meter.add(name, w.process_groups())
            print(f"{name}: process start -> first job-take {cold[name]['first_take_s']} s, "
                  f"first job served {cold[name]['first_job_served_s']} s", flush=True)

        async def one_round(path: str, concurrency: int, tokens: int, offset_s: float = 0.0) -> Round:
            if path == "raw":
                return await raw_round(worker.engine, prompt_ids, concurrency, tokens)
            if path == "handler":
                return await handler_round(concurrency, tokens)
            return await workers[path].round(concurrency, tokens, offset_s)

        # As vLLM's OpenAI server does after its start-up (vllm.utils.gc_utils.freeze_gc_heap): without it,
        # full collections over this process's heap (vLLM, torch, transformers) stall the in-process paths
        # and the emulators for 0.1-0.4 s at random.
        gc.collect()
        gc.freeze()
        for path in args.paths:  # warm-up: the first requests of each path pay one-time costs
            await meter.settle()
            await one_round(path, max_c, 8)
        settle_s: List[float] = []
        # The SDK's job loop looks at its job queue every 100 ms, in a cadence that starts when its last job
        # ended. A random offset between the idle worker's job-take request and the submission makes each
        # round's jobs arrive at a random phase of that cadence, as real jobs do.
        phase = random.Random(7)

        rounds: List[Dict[str, Any]] = []
        cpu: Dict[str, Dict[str, float]] = {p: {} for p in args.paths}
        tokens_by_path: Dict[str, int] = {p: 0 for p in args.paths}
        for concurrency in args.concurrency:
            for r in range(args.rounds):
                order = list(args.paths[r % len(args.paths):]) + list(args.paths[:r % len(args.paths)])
                for path in order:
                    settle_s.append(await meter.settle())
                    offset = phase.uniform(0, 0.1)
                    if path in ("raw", "handler"):
                        await asyncio.sleep(offset)
                    before = meter.read()
                    result = await one_round(path, concurrency, args.tokens, offset)
                    after = meter.read()
                    expected = concurrency * args.tokens
                    if result.tokens != expected:
                        raise RuntimeError(f"{path} c{concurrency}: {result.tokens} tokens, expected {expected}")
                    for group in after:
                        cpu[path][group] = cpu[path].get(group, 0.0) + after[group] - before[group]
                    tokens_by_path[path] += result.tokens
                    row = {"path": path, "concurrency": concurrency, "round": r + 1, "tokens": result.tokens,
                           "wall_s": round(result.wall_s, 4), "tok_s": round(result.tok_s, 1),
                           "ttfc_ms": [round(1000 * t, 2) for t in result.ttfc_s]}
                    if result.take_s is not None:
                        row["take_ms"] = [round(1000 * t, 2) for t in result.take_s]
                        row["stream_posts"] = result.posts
                    if result.first_token_s is not None:
                        row["first_token_ms"] = [round(1000 * t, 2) for t in result.first_token_s]
                    if result.handler_ttft_s is not None:
                        row["handler_ttft_ms"] = [round(1000 * t, 2) for t in result.handler_ttft_s]
                    rounds.append(row)
                    print(f"c{concurrency:<3d} round {r + 1:2d} {path:9s} {result.tokens:6d} tokens in "
                          f"{result.wall_s:6.3f} s = {result.tok_s:8.1f} tok/s, TTFC p50 "
                          f"{1000 * percentile(result.ttfc_s, 0.5):7.1f} ms", flush=True)
        cpu_per_1k = {p: {g: round(1000 * s / tokens_by_path[p], 3) for g, s in groups.items() if s > 0.005}
                      for p, groups in cpu.items()}
        return {"cold_start": cold, "rounds": rounds, "cpu_seconds_per_1k_tokens": cpu_per_1k,
                "settle_s_median": round(statistics.median(settle_s), 2)}
    finally:
        for w in workers.values():
            w.close()
        if worker is not None:
            worker.close()


def summarize(rounds: List[Dict[str, Any]], paths: List[str], levels: List[int]) -> List[Dict[str, Any]]:
    summary = []
    for concurrency in levels:
        rows = {}
        for path in paths:
            mine = [r for r in rounds if r["path"] == path and r["concurrency"] == concurrency]
            ttfc = [t for r in mine for t in r["ttfc_ms"]]
            rows[path] = {"path": path, "concurrency": concurrency, "rounds": len(mine),
                          "tok_s": round(statistics.median(r["tok_s"] for r in mine), 1),
                          "ttfc_p50_ms": round(percentile(ttfc, 0.5), 1),
                          "ttfc_p95_ms": round(percentile(ttfc, 0.95), 1)}
            if mine and "take_ms" in mine[0]:
                rows[path]["take_p50_ms"] = round(percentile([t for r in mine for t in r["take_ms"]], 0.5), 1)
                rows[path]["stream_posts_per_job"] = statistics.median(n for r in mine for n in r["stream_posts"])
            if mine and "first_token_ms" in mine[0]:
                rows[path]["first_token_p50_ms"] = round(
                    percentile([t for r in mine for t in r["first_token_ms"]], 0.5), 1)
            if mine and "handler_ttft_ms" in mine[0]:
                # the handler's own time from its start to the first token; TTFC minus take minus this
                # is the SDK's part: its job queue poll (0-100 ms) and the first stream POST
                rows[path]["handler_ttft_p50_ms"] = round(
                    percentile([t for r in mine for t in r["handler_ttft_ms"]], 0.5), 1)
        raw = rows.get("raw")
        for path, row in rows.items():
            if raw:
                row["over_raw"] = round(row["tok_s"] / raw["tok_s"], 3)
                row["added_ttfc_p50_ms"] = round(row["ttfc_p50_ms"] - raw["ttfc_p50_ms"], 1)
            if path == "emulator" and "proxy" in rows:
                row["over_proxy"] = round(row["tok_s"] / rows["proxy"]["tok_s"], 3)
            summary.append(row)
    return summary


def check_targets(summary: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    checks = []
    for row in summary:
        c = row["concurrency"]
        if row["path"] == "handler" and "over_raw" in row:
            checks.append({"target": f"handler >= {TARGETS['handler_over_raw']} x raw", "concurrency": c,
                           "value": row["over_raw"], "met": row["over_raw"] >= TARGETS["handler_over_raw"]})
        if row["path"] == "emulator" and "over_raw" in row:
            checks.append({"target": f"emulator >= {TARGETS['emulator_over_raw']} x raw", "concurrency": c,
                           "value": row["over_raw"], "met": row["over_raw"] >= TARGETS["emulator_over_raw"]})
        if row["path"] == "emulator" and "over_proxy" in row:
            checks.append({"target": f"emulator >= {TARGETS['emulator_over_proxy']} x proxy", "concurrency": c,
                           "value": row["over_proxy"], "met": row["over_proxy"] >= TARGETS["emulator_over_proxy"]})
        if row["path"] in ("handler", "emulator") and "added_ttfc_p50_ms" in row:
            checks.append({"target": f"{row['path']} added TTFC p50 <= {TARGETS['added_ttfc_p50_ms']:g} ms",
                           "concurrency": c, "value": row["added_ttfc_p50_ms"],
                           "met": row["added_ttfc_p50_ms"] <= TARGETS["added_ttfc_p50_ms"]})
    return checks


def format_report(result: Dict[str, Any]) -> str:
    lines = [f"CPU suite {result['date']}: {result['machine']['cpu_count']} CPUs, vllm {result['versions']['vllm']}, "
             f"torch {result['versions']['torch']}, runpod {result['versions']['runpod']}",
             f"{result['settings']['tokens']} tokens per job, median of {result['settings']['rounds']} alternating "
             f"rounds; TTFC percentiles over all jobs of those rounds; take = submission -> job handed "
             f"to the worker; SDK log level {result['settings']['sdk_log_level']}",
             "",
             f"{'path':26s} {'conc':>4s} {'tok/s':>8s} {'x raw':>6s} {'TTFC p50':>9s} {'p95':>8s} "
             f"{'+p50 vs raw':>11s} {'take p50':>9s} {'POSTs/job':>9s}"]
    for row in result["summary"]:
        over = f"{row['over_raw']:.3f}" if "over_raw" in row else "-"
        added = f"{row['added_ttfc_p50_ms']:+.1f} ms" if "added_ttfc_p50_ms" in row else "-"
        take = f"{row['take_p50_ms']:.1f}ms" if "take_p50_ms" in row else "-"
        posts = f"{row['stream_posts_per_job']:g}" if "stream_posts_per_job" in row else "-"
        extra = f"   {row['over_proxy']:.2f}x proxy" if "over_proxy" in row else ""
        lines.append(f"{LABELS[row['path']]:26s} {row['concurrency']:4d} {row['tok_s']:8.1f} {over:>6s} "
                     f"{row['ttfc_p50_ms']:7.1f}ms {row['ttfc_p95_ms']:6.1f}ms {added:>11s} {take:>9s} {posts:>9s}"
                     f"{extra}")
    for row in result["summary"]:
        if "handler_ttft_p50_ms" in row:
            lines.append(f"  (c) at c{row['concurrency']}: TTFC p50 {row['ttfc_p50_ms']:.1f} ms = take "
                         f"{row['take_p50_ms']:.1f} ms + handler start -> first token {row['handler_ttft_p50_ms']:.1f} ms"
                         f" (p50) + the rest (SDK job-queue poll, first stream POST)")
    cold = result["cold_start"]
    lines += ["", "cold start:"]
    if "raw_engine_init_s" in cold:
        lines.append(f"  (a) raw engine init, AsyncLLM.from_engine_args in-process: {cold['raw_engine_init_s']:6.1f} s "
                     f"(whole in-process start_worker: {cold['in_process_start_worker_s']:.1f} s)")
    for name in ("emulator", "proxy"):
        if name in cold:
            lines.append(f"  {LABELS[name]:26s} process start -> first job-take {cold[name]['first_take_s']:6.1f} s, "
                         f"-> first job served {cold[name]['first_job_served_s']:6.1f} s")
    lines += ["", "CPU seconds per 1000 tokens, by process group, summed over each path's rounds:"]
    for path, groups in result["cpu_seconds_per_1k_tokens"].items():
        lines.append(f"  {path:9s} " + ", ".join(f"{g} {s:.3f}" for g, s in sorted(groups.items())))
    lines += ["", "targets:"]
    for check in result["targets"]:
        lines.append(f"  {'met   ' if check['met'] else 'MISSED'} {check['target']} at c{check['concurrency']}: "
                     f"{check['value']}")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> Dict[str, str]:
    from importlib.metadata import version

    import torch
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "runpod": version("runpod"),
            "python": platform.python_version()}


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="output tokens per job")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=11, help="rounds per path and concurrency")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.1)
    parser.add_argument("--sdk-log-level", default=None,
                        help="RUNPOD_LOG_LEVEL for (c) and (d); default: unset, the runpod SDK's DEBUG")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu-suite.json"))
    args = parser.parse_args(argv)
    if len(set(args.paths)) != len(args.paths):
        parser.error("a path is named twice")
    log_dir = Path(tempfile.mkdtemp(prefix="cpu-suite-"))
    print(f"worker logs in {log_dir}", flush=True)
    started = time.monotonic()
    measured = asyncio.run(run_suite(args, log_dir, dict(os.environ)))
    result = {
        "suite": "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([".venv/bin/python", "-m", "bench", "cpu", *argv]),
        "machine": {"cpu_count": os.cpu_count(), "cpu": cpu_model(),
                    "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
        "versions": versions(),
        "settings": {"tokens": args.tokens, "concurrency": args.concurrency, "rounds": args.rounds,
                     "paths": args.paths, "max_model_len": args.max_model_len,
                     "gpu_memory_utilization": args.gpu_memory_utilization, "dtype": "bfloat16",
                     "sampling": "greedy, ignore_eos, streamed", "prompts": PROMPTS,
                     "sdk_log_level": args.sdk_log_level or "DEBUG (SDK default)",
                     "layout": "all engines at once, rounds alternate over the paths, each round starts "
                               "once the other engines' processes are quiet",
                     "settle_s_median": measured["settle_s_median"]},
        "cold_start": measured["cold_start"],
        "summary": summarize(measured["rounds"], args.paths, args.concurrency),
        "cpu_seconds_per_1k_tokens": measured["cpu_seconds_per_1k_tokens"],
        "rounds": measured["rounds"],
        "suite_seconds": round(time.monotonic() - started, 1),
    }
    result["targets"] = check_targets(result["summary"])
    print("\n" + format_report(result), flush=True)
    write_result(result, Path(args.out))


def write_result(result: Dict[str, Any], out: Path) -> None:
    """The suite's JSON result, for BENCHMARKS.md and bench/plot.py."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {out} (suite took {result['suite_seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
