"""Platform benchmark: the worker as RunPod runs it against the raw engine, side by side in one run.

    .venv/bin/python -m bench platform                        # CPU: the tiny model, ~13 min on 2 cores
    python3 -m bench platform --model DIR --max-model-len 4096 --gpu-memory-utilization 0.42   # a GPU
    bash bench/gpu_session.sh platform                        # the H200 step, GaMS-9B-shaped weights

Two paths (more with ``--baseline-worker`` and ``--variant``) serve the same jobs (one of ``cpu_suite.PROMPTS``,
greedy, ``ignore_eos``, ``--tokens`` output tokens, streamed):

- **raw**: vLLM's ``AsyncLLM.generate`` in this process (DELTA outputs, the token ids the
  handler would pass), on an engine started by ``start_worker`` with the worker's settings.
- **platform**: ``python handler.py`` as a subprocess under the real runpod SDK job loop
  (gams_worker/platform/job_loop.py), taking jobs from and posting every chunk and result to
  ``tests/harness/runpod_emulator.py`` (RunPod's worker API on 127.0.0.1, in this process),
  with ``MAX_CONCURRENCY=--max-concurrency`` and ``RUNPOD_LOG_LEVEL=INFO`` as in the image.
- **baseline** (with ``--baseline-worker PATH``): the same as platform, but running another
  checkout's ``handler.py`` (e.g. the commit before a change to the job loop), so before and after
  are measured side by side.
- **variants** (``--variant NAME:VAR=VALUE[,VAR=VALUE...]``, repeatable): the platform path with
  those variables set, e.g. ``stats-on:LOG_ENGINE_STATS=true`` or ``budget-1000:STREAM_POSTS_PER_SECOND=1000``.

``--engines together`` (the default): all engines run at once (on a GPU each gets
``--gpu-memory-utilization`` of its memory); runs alternate between the paths (the order rotates each
round) and each starts once the other processes are quiet. ``--engines one-at-a-time``: each path's
engine runs alone (raw first, then each worker), so each may take the GPU as a deployed worker does
(0.90): on an H200, 512 streams need ~47 GB of KV cache beside 18.5 GB of weights, which two engines at
0.42 do not have. ``--max-num-seqs`` sets MAX_NUM_SEQS for every path.

Load:

- **bursts** of ``c`` jobs (``--concurrency``), submitted one by one in a tight loop (each its own
  enqueue, as ``c`` clients calling within a few milliseconds) to an idle worker, a random
  0-100 ms after its job-take request came in; raw starts ``c`` requests at once.
- **Poisson**: ``--poisson-jobs`` jobs arriving at random (exponential gaps, one seeded schedule
  for all paths) at ``--poisson-load`` × the capacity that raw measured at the largest burst
  (its tokens/s / ``--tokens``). Raw admits at most ``--max-concurrency`` requests at once (a
  semaphore, the worker's concurrency), so all paths queue alike. Where the platform path's own
  capacity is lower than raw's (on 2 CPU cores its front end is the bottleneck), that load is more
  than it can serve and its queue grows.

Figures per run: throughput = completion tokens / (last result − first submission); queue wait =
submission → the job handed to the worker (the emulator's hand-out; raw: the wait for a free slot);
TTFC = submission → the first stream POST arriving at the emulator (raw: → the first output with text;
raw TTFT: → the first output with tokens); handler TTFT = the job's own ``usage.time_to_first_token_s``
(handler start → first token), so TTFC − queue wait − handler TTFT is what the platform path adds
outside the engine (the worker's pick-up and request set-up, the first token's text, the first stream
POST). Stream POSTs a second (the flush policy's budget, gams_worker/jobs/streaming.py), and the CPU
share of one core, over the run, of the worker's main process, its engine processes and the emulator's
thread (raw: this process, its front end): an emulator near 100 % would be the bottleneck, not the
worker. ``--py-spy PATH`` records the worker's main process during the first platform run at
``--spy-at`` streams and prints its hottest frames. Bursts: median throughput over ``--rounds``,
percentiles over all jobs of those rounds. Goals (issue 23, for the H200): platform ≥ 0.95 × raw up to
128 streams and ≥ 0.90 × at 256 and 512; queue wait p50 ≤ 20 ms at the largest burst; TTFC p50 at 32 ≤
raw TTFT p50 + 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import psutil

from bench.cpu_suite import (PROMPTS, ROOT, CpuMeter, PlatformWorker, cpu_model, cpu_seconds, in_process_groups,
                             job_input, usage_tokens_sdk, versions, write_result)
from bench.gpu_suite import percentile
from bench.http_paths import HTTP_PATHS, HttpPath, http_goals
from tests.harness.runpod_emulator import JobRecord

# Issue 23 (H200): >= 0.95 x raw up to 128 streams, >= 0.90 x beyond; issue 14's queue and TTFC goals.
GOALS = {"platform_over_raw": 0.95, "platform_over_raw_above_128": 0.90, "queue_wait_p50_ms": 20.0,
         "added_ttfc_p50_ms_at_32": 20.0}
RUN_TIMEOUT_S = 600
EMULATOR_BUSY = 0.7  # an emulator thread above this share of a core may be what limits a run


class Run:
    """One burst or Poisson run of one path: per job, seconds from its submission (or arrival)."""

    def __init__(self, tokens: int, wall_s: float, ttfc_s: List[float], queue_s: List[float],
                 first_token_s: Optional[List[float]] = None, handler_ttft_s: Optional[List[float]] = None,
                 stream_posts: Optional[int] = None, tail_s: Optional[List[float]] = None,
                 decode_s: Optional[List[float]] = None, text_events: Optional[List[int]] = None):
        self.tokens = tokens
        self.wall_s = wall_s
        self.ttfc_s = ttfc_s
        self.queue_s = queue_s
        self.first_token_s = first_token_s  # raw only
        self.handler_ttft_s = handler_ttft_s  # platform only: handler start -> first token (the job's usage)
        self.stream_posts = stream_posts  # platform only: stream POSTs the emulator received
        self.tail_s = tail_s  # HTTP paths only: last event with text -> end of the stream
        self.decode_s = decode_s  # HTTP paths only: first event with text -> last
        self.text_events = text_events  # HTTP paths only: events with text per stream
        self.cpu_share: Dict[str, float] = {}  # process group -> CPU seconds / wall seconds of the run

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s

    def row(self) -> Dict[str, Any]:
        row = {"tokens": self.tokens, "wall_s": round(self.wall_s, 4), "tok_s": round(self.tok_s, 1),
               "ttfc_ms": ms(self.ttfc_s), "queue_ms": ms(self.queue_s)}
        if self.first_token_s is not None:
            row["first_token_ms"] = ms(self.first_token_s)
        if self.handler_ttft_s is not None:
            row["handler_ttft_ms"] = ms(self.handler_ttft_s)
        if self.tail_s is not None:
            row["tail_ms"] = ms(self.tail_s)
            row["decode_ms"] = ms(self.decode_s)
            row["text_events"] = self.text_events
        if self.stream_posts is not None:
            row["stream_posts"] = self.stream_posts
            row["stream_posts_per_s"] = round(self.stream_posts / self.wall_s, 1)
        row["cpu_share"] = {name: round(share, 3) for name, share in self.cpu_share.items()}
        return row


def ms(seconds: List[float]) -> List[float]:
    return [round(1000 * s, 2) for s in seconds]


# --------------------------------------------------------------------------- raw
class RawEngine:
    """The in-process engine, driven as the handler would drive it."""

    def __init__(self, engine, prompt_ids: List[List[int]], max_concurrency: int):
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.max_concurrency = max_concurrency

    async def _job(self, i: int, tokens: int, arrived: float, admission: asyncio.Semaphore):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        asked = time.monotonic()
        async with admission:
            admitted = time.monotonic()
            count, first_token, first_text = 0, None, None
            ids = self.prompt_ids[i % len(self.prompt_ids)]
            async for output in self.engine.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
                n = sum(len(c.token_ids) for c in output.outputs)
                if n and first_token is None:
                    first_token = time.monotonic()
                if first_text is None and any(c.text for c in output.outputs):
                    first_text = time.monotonic()
                count += n
            ended = time.monotonic()
        # Queue wait: the time this job waited for a free slot only (a burst's requests also wait for the
        # front end to add the ones before them, which counts in their TTFC, as on the platform).
        return count, admitted - asked, (first_text or ended) - arrived, (first_token or ended) - arrived, ended

    async def run(self, arrivals: List[float], tokens: int) -> Run:
        """Jobs arriving ``arrivals`` seconds from now (all 0: a burst)."""
        admission = asyncio.Semaphore(self.max_concurrency)
        started = time.monotonic()

        async def arrive(i: int, at: float):
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            return await self._job(i, tokens, time.monotonic(), admission)

        if all(at == 0 for at in arrivals):  # a burst: every request starts in this instant
            jobs = await asyncio.gather(*(self._job(i, tokens, started, admission) for i in range(len(arrivals))))
        else:
            jobs = await asyncio.gather(*(arrive(i, at) for i, at in enumerate(arrivals)))
        return Run(sum(j[0] for j in jobs), max(j[4] for j in jobs) - started, [j[2] for j in jobs],
                   [j[1] for j in jobs], first_token_s=[j[3] for j in jobs])


# --------------------------------------------------------------------------- platform
class PlatformPath(PlatformWorker):
    """``python handler.py`` under the SDK loop, fed by its own emulator."""

    async def run(self, arrivals: List[float], tokens: int, offset_s: float = 0.0) -> Run:
        await self._wait_idle()
        await asyncio.sleep(offset_s)
        started = time.monotonic()
        records: List[JobRecord] = []
        for i, at in enumerate(arrivals):
            delay = started + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            job_id = self.emulator.submit(job_input(i, tokens))  # one enqueue per job, as clients do
            records.append(self.emulator.jobs[job_id])
        await self._wait(records, RUN_TIMEOUT_S)
        self.last_done = max(r.results[0][0] for r in records)
        for r in records:
            if not r.chunks:
                raise RuntimeError(f"{self.name}: job {r.id} posted no stream chunk: {r.result}")
        first = min(r.submitted_at for r in records)
        return Run(sum(usage_tokens_sdk(r.result["output"]) for r in records), self.last_done - first,
                   [r.chunks[0][0] - r.submitted_at for r in records],
                   [r.taken_at[0] - r.submitted_at for r in records],
                   handler_ttft_s=[r.result["output"][-1]["usage"]["time_to_first_token_s"] for r in records],
                   stream_posts=sum(len(r.chunks) for r in records))

    def cpu_groups(self) -> Dict[str, Any]:
        """What the CPU share is read of: the worker's main process, its children (the engine), the emulator."""
        groups = self.process_groups()
        return {"worker_main": groups["worker"], "engine": groups.get("engine", []),
                "emulator": EmulatorThread(self.emulator)}


class EmulatorThread:
    """The CPU time of the emulator's server thread, in this process (its aiohttp loop)."""

    def __init__(self, emulator):
        self.native_id = emulator._thread.native_id

    def cpu_seconds(self) -> float:
        for thread in psutil.Process().threads():
            if thread.id == self.native_id:
                return thread.user_time + thread.system_time
        return 0.0


def group_cpu_seconds(group: Any) -> float:
    return group.cpu_seconds() if isinstance(group, EmulatorThread) else cpu_seconds(group)


class PySpy:
    """``py-spy record`` of one process for a while, in the background; its hottest frames afterwards."""

    def __init__(self, binary: str, pid: int, seconds: int, out: Path):
        self.out = out
        self.proc = subprocess.Popen([binary, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100",
                                      "--format", "raw", "--nonblocking", "--output", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.seconds = seconds

    def summary(self, top: int = 25) -> Dict[str, Any]:
        """Wait for the recording; the frames in most samples (inclusive, counted below the event loop's
        callback, so that the loop's own frames, in every sample, do not fill the list) and at the top of
        most (self)."""
        try:
            _, err = self.proc.communicate(timeout=self.seconds + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.out.exists():
            return {"error": f"py-spy exit {self.proc.returncode}: {err[-500:]}"}
        inclusive: Dict[str, int] = {}
        own: Dict[str, int] = {}
        total = 0
        for line in self.out.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            samples = int(count)
            total += samples
            frames = stack.split(";")
            callbacks = [i for i, frame in enumerate(frames) if frame.startswith("Handle._run (asyncio/events.py")]
            for frame in set(frames[callbacks[-1] + 1:] if callbacks else frames):
                inclusive[frame] = inclusive.get(frame, 0) + samples
            own[frames[-1]] = own.get(frames[-1], 0) + samples

        def ranked(counts: Dict[str, int]) -> List[List[Any]]:
            most = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
            return [[round(n / max(total, 1), 3), frame] for frame, n in most]

        return {"samples": total, "file": str(self.out), "inclusive": ranked(inclusive), "self": ranked(own)}


# --------------------------------------------------------------------------- the suite
def poisson_arrivals(count: int, rate_per_s: float, seed: int = 14) -> List[float]:
    rng = random.Random(seed)
    at, arrivals = 0.0, []
    for _ in range(count):
        arrivals.append(at)
        at += rng.expovariate(rate_per_s)
    return arrivals


def parse_variant(text: str) -> Tuple[str, Dict[str, str]]:
    """``NAME:VAR=VALUE[,VAR=VALUE...]`` -> (NAME, {VAR: VALUE})."""
    name, _, assignments = text.partition(":")
    env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    if not name or not env or name in ("raw", "platform", "baseline"):
        raise ValueError(f"--variant {text!r}: expected NAME:VAR=VALUE[,VAR=VALUE...], NAME not raw/platform/baseline")
    return name, env


class RawPath:
    """The raw engine in this process, started by start_worker with the worker's settings."""

    name = "raw"

    def __init__(self, config: Any, max_concurrency: int):
        self.config = config
        self.max_concurrency = max_concurrency
        self.worker = None
        self.raw: Optional[RawEngine] = None

    async def start(self) -> float:
        from gams_worker.worker import start_worker

        started = time.monotonic()
        self.worker = start_worker(self.config)
        prompt_ids = [self.worker.tokenizer.encode(p) for p in PROMPTS]  # what the handler passes
        self.raw = RawEngine(self.worker.engine, prompt_ids, self.max_concurrency)
        return round(time.monotonic() - started, 1)

    async def run(self, arrivals: List[float], tokens: int, offset_s: float) -> Run:
        await asyncio.sleep(offset_s)
        return await self.raw.run(arrivals, tokens)

    def cpu_groups(self) -> Dict[str, Any]:
        groups = in_process_groups()
        return {"front_end": groups["bench"], "engine": groups["engine"]}

    def close(self) -> None:
        if self.worker is not None:
            engine = in_process_groups()["engine"]
            self.worker.close()
            self.worker = None
            # One engine at a time: the next may start only once this one's processes (and GPU memory) are gone.
            psutil.wait_procs(engine, timeout=60)


async def timed_run(path: Any, arrivals: List[float], tokens: int, offset_s: float) -> Run:
    """One run of ``path``, with each of its process groups' CPU share over it."""
    groups = path.cpu_groups()
    before = {name: group_cpu_seconds(group) for name, group in groups.items()}
    run = await path.run(arrivals, tokens, offset_s)
    run.cpu_share = {name: (group_cpu_seconds(group) - before[name]) / run.wall_s for name, group in groups.items()}
    return run


async def run_suite(args, log_dir: Path) -> Dict[str, Any]:
    from builder import tiny_model
    from gams_worker.config import load_config
    from gams_worker.worker import setup_logging

    model = args.model or str(tiny_model.build())
    common = {"MODEL_NAME": model, "MAX_MODEL_LEN": str(args.max_model_len),
              "GPU_MEMORY_UTILIZATION": str(args.gpu_memory_utilization), "VLLM_NO_USAGE_STATS": "1",
              "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    if args.max_num_seqs:
        common["MAX_NUM_SEQS"] = str(args.max_num_seqs)
    sub_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    sub_env.update(common)
    sub_env["RUNPOD_LOG_LEVEL"] = "INFO"  # as the image sets it (the SDK's default DEBUG logs every chunk)
    meter = CpuMeter()
    config = load_config({**common, "LOG_LEVEL": "WARNING", "MAX_CONCURRENCY": str(args.max_concurrency)})
    setup_logging(config)
    # name -> (script, extra environment); raw first.
    workers: Dict[str, Tuple[str, Dict[str, str]]] = {} if args.no_queue else {"platform": (args.worker_script, {})}
    if args.baseline_worker:
        workers["baseline"] = (args.baseline_worker, {})
    for name, env in (parse_variant(v) for v in args.variant):
        workers[name] = (args.worker_script, env)
    paths: Dict[str, Any] = {"raw": RawPath(config, args.max_concurrency)}
    http_paths = tuple(p for p in HTTP_PATHS if p != "http-baseline" or args.http_baseline) if args.http else ()
    cold: Dict[str, Any] = {}
    spies: Dict[str, Any] = {}
    phase = random.Random(7)
    bursts: List[Dict[str, Any]] = []
    poisson: List[Dict[str, Any]] = []
    rate = None

    async def start(name: str) -> None:
        if name == "raw":
            cold["raw_start_worker_s"] = await paths["raw"].start()
            meter.add("in_process", in_process_groups())
            print(f"raw: in-process start_worker {cold['raw_start_worker_s']} s", flush=True)
            return
        if name in http_paths:
            port = args.http_port + HTTP_PATHS.index(name)  # each its own: with --engines together both listen
            paths[name] = HttpPath(name, model, port, args, sub_env, log_dir)
            await meter.settle()
            cold[name] = await paths[name].start()
            print(f"{name}: process start -> first health answer {cold[name]['first_health_answer_s']} s, "
                  f"-> ready {cold[name]['ready_s']} s", flush=True)
            return
        script, extra = workers[name]
        paths[name] = PlatformPath(name, [sys.executable, script], {**sub_env, **extra}, log_dir,
                                   args.max_concurrency, usage_tokens_sdk)
        await meter.settle()
        cold[name] = await paths[name].cold_start(args.tokens)
        meter.add(name, paths[name].process_groups())
        print(f"{name} ({script}{' ' + ' '.join(f'{k}={v}' for k, v in extra.items()) if extra else ''}): "
              f"process start -> first job-take {cold[name]['first_take_s']} s, first job served "
              f"{cold[name]['first_job_served_s']} s", flush=True)

    async def burst(name: str, concurrency: int, r: int) -> None:
        await meter.settle()
        spy = None
        if args.py_spy and name == "platform" and concurrency == args.spy_at and r == 0:
            spy = PySpy(args.py_spy, paths[name].proc.pid, args.spy_seconds,
                        log_dir / f"py-spy-{name}-c{concurrency}.txt")
        result = await timed_run(paths[name], [0.0] * concurrency, args.tokens, phase.uniform(0, 0.1))
        if spy is not None:
            spies[f"{name} c{concurrency}"] = spy.summary()
        if result.tokens != concurrency * args.tokens:
            raise RuntimeError(f"{name} c{concurrency}: {result.tokens} tokens, expected {concurrency * args.tokens}")
        bursts.append({"path": name, "concurrency": concurrency, "round": r + 1, **result.row()})
        posts = f", {result.stream_posts / result.wall_s:6.0f} POSTs/s" if result.stream_posts is not None else ""
        shares = " ".join(f"{group} {share:.0%}" for group, share in result.cpu_share.items())
        print(f"c{concurrency:<3d} round {r + 1:2d} {name:10s} {result.tok_s:8.1f} tok/s, TTFC p50 "
              f"{1000 * percentile(result.ttfc_s, 0.5):7.1f} ms, queue p50 "
              f"{1000 * percentile(result.queue_s, 0.5):7.1f} ms{posts}; CPU {shares}", flush=True)

    async def poisson_runs(names: List[str]) -> None:
        nonlocal rate
        if not args.poisson_jobs:
            return
        if rate is None:
            top = max(args.concurrency)
            capacity_tok_s = statistics.median(b["tok_s"] for b in bursts
                                               if b["path"] == "raw" and b["concurrency"] == top)
            rate = args.poisson_load * capacity_tok_s / args.tokens
            print(f"Poisson: {args.poisson_jobs} jobs at {rate:.2f} jobs/s = {args.poisson_load} x raw capacity at "
                  f"c{top} ({capacity_tok_s:.0f} tok/s / {args.tokens} tokens)", flush=True)
        arrivals = poisson_arrivals(args.poisson_jobs, rate)
        for r in range(args.poisson_rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                await meter.settle()
                result = await timed_run(paths[name], arrivals, args.tokens, 0.0)
                poisson.append({"path": name, "round": r + 1, "rate_per_s": round(rate, 3), **result.row()})
                print(f"Poisson round {r + 1} {name:10s} {result.tok_s:8.1f} tok/s, TTFC p50/p95 "
                      f"{1000 * percentile(result.ttfc_s, 0.5):.1f}/{1000 * percentile(result.ttfc_s, 0.95):.1f}"
                      f" ms, queue p50/p95 {1000 * percentile(result.queue_s, 0.5):.1f}/"
                      f"{1000 * percentile(result.queue_s, 0.95):.1f} ms", flush=True)

    names = ["raw", *workers, *http_paths]
    try:
        if args.engines == "together":
            for name in names:  # one at a time, the other engines idle
                await start(name)
            gc.collect()
            gc.freeze()  # as the worker does after start-up: no full collections over vLLM's heap mid-run
            for name in names:  # warm-up: first requests pay one-time costs
                await meter.settle()
                await paths[name].run([0.0] * max(args.concurrency), args.tokens, 0.0)
            for concurrency in args.concurrency:
                for r in range(args.rounds):
                    for name in names[r % len(names):] + names[:r % len(names)]:
                        await burst(name, concurrency, r)
            await poisson_runs(names)
        else:  # each engine alone: raw's phase, then each worker's
            for name in names:
                await start(name)
                gc.collect()
                gc.freeze()
                await paths[name].run([0.0] * max(args.concurrency), args.tokens, 0.0)  # warm-up
                for concurrency in args.concurrency:
                    for r in range(args.rounds):
                        await burst(name, concurrency, r)
                await poisson_runs([name])
                paths[name].close()
                gc.unfreeze()
        return {"cold_start": cold, "bursts": bursts, "poisson": poisson,
                "poisson_rate_per_s": round(rate, 3) if rate else None, "py_spy": spies}
    finally:
        for path in paths.values():
            path.close()


def summarize(runs: List[Dict[str, Any]], key: Optional[str]) -> List[Dict[str, Any]]:
    """One row per (path, ``key`` value): median tok/s, percentiles over all jobs of those runs."""
    groups: Dict[Any, Dict[str, List[Dict[str, Any]]]] = {}
    for run in runs:
        groups.setdefault(run[key] if key else "poisson", {}).setdefault(run["path"], []).append(run)
    summary = []
    for level, paths in groups.items():
        rows = {}
        for path, mine in paths.items():
            row = {"path": path, "load": level, "runs": len(mine),
                   "tok_s": round(statistics.median(r["tok_s"] for r in mine), 1)}
            for name in ("ttfc_ms", "queue_ms", "first_token_ms", "handler_ttft_ms", "tail_ms", "decode_ms"):
                if name in mine[0]:
                    values = [v for r in mine for v in r[name]]
                    row[name.replace("_ms", "_p50_ms")] = round(percentile(values, 0.5), 1)
                    row[name.replace("_ms", "_p95_ms")] = round(percentile(values, 0.95), 1)
            if "handler_ttft_ms" in mine[0]:  # per job: TTFC - queue wait - handler TTFT
                outside = [t - q - h for r in mine for t, q, h in zip(r["ttfc_ms"], r["queue_ms"], r["handler_ttft_ms"])]
                row["outside_engine_p50_ms"] = round(percentile(outside, 0.5), 1)
            if "text_events" in mine[0]:
                row["text_events_p50"] = statistics.median(n for r in mine for n in r["text_events"])
            if "stream_posts_per_s" in mine[0]:
                row["stream_posts_per_s"] = round(statistics.median(r["stream_posts_per_s"] for r in mine), 1)
            row["cpu_share"] = {group: round(statistics.median(r["cpu_share"][group] for r in mine), 3)
                                for group in mine[0].get("cpu_share", {})}
            rows[path] = row
        for path, row in rows.items():
            if path != "raw" and "raw" in rows:
                row["over_raw"] = round(row["tok_s"] / rows["raw"]["tok_s"], 3)
                row["ttfc_p50_over_raw_ttft_ms"] = round(row["ttfc_p50_ms"] - rows["raw"]["first_token_p50_ms"], 1)
        summary += ordered(rows)
    return summary


def ordered(rows: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Raw, platform, baseline, then the variants, as they were run."""
    first = [p for p in ("raw", "platform", "baseline") if p in rows]
    return [rows[p] for p in first + [p for p in rows if p not in first]]


def check_goals(bursts: List[Dict[str, Any]], top: int) -> List[Dict[str, Any]]:
    checks = []
    for row in bursts:
        if row["path"] != "platform" or "over_raw" not in row:
            continue
        c = row["load"]
        floor = GOALS["platform_over_raw"] if c <= 128 else GOALS["platform_over_raw_above_128"]
        checks.append({"goal": f"platform >= {floor} x raw", "at": f"c{c}",
                       "value": row["over_raw"], "met": row["over_raw"] >= floor})
        if c == top:
            checks.append({"goal": f"queue wait p50 <= {GOALS['queue_wait_p50_ms']:g} ms", "at": f"c{c}",
                           "value": row["queue_p50_ms"], "met": row["queue_p50_ms"] <= GOALS["queue_wait_p50_ms"]})
        if c == 32:
            added = row["ttfc_p50_over_raw_ttft_ms"]
            checks.append({"goal": f"TTFC p50 <= raw TTFT p50 + {GOALS['added_ttfc_p50_ms_at_32']:g} ms",
                           "at": "c32", "value": added, "met": added <= GOALS["added_ttfc_p50_ms_at_32"]})
    return checks


def format_report(result: Dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"platform suite {result['date']}: {result['device']}, vllm {result['versions']['vllm']}, "
             f"runpod {result['versions']['runpod']}; model {s['model']}",
             f"{s['tokens']} tokens per job, MAX_CONCURRENCY={s['max_concurrency']}, "
             f"MAX_NUM_SEQS={s.get('max_num_seqs') or 'sized by the worker'}, engines {s.get('engines', 'together')}; "
             f"bursts: median tok/s of {s['rounds']} rounds, percentiles over all their jobs; times from each "
             f"job's submission",
             "",
             f"{'load':>8s} {'path':13s} {'tok/s':>9s} {'x raw':>6s} {'queue p50':>10s} {'p95':>8s} "
             f"{'TTFC p50':>9s} {'p95':>8s} {'TTFT p50':>9s} {'handler TTFT':>12s} {'outside':>8s} "
             f"{'POSTs/s':>8s}  CPU share of one core (median)"]
    busy_emulator = []
    for row in result["summary_bursts"] + result["summary_poisson"]:
        load = f"c{row['load']}" if isinstance(row["load"], int) else "Poisson"
        over = f"{row['over_raw']:.3f}" if "over_raw" in row else "-"
        ttft = f"{row['first_token_p50_ms']:.1f}ms" if "first_token_p50_ms" in row else "-"
        handler = f"{row['handler_ttft_p50_ms']:.1f}ms" if "handler_ttft_p50_ms" in row else "-"
        outside = f"{row['outside_engine_p50_ms']:.1f}ms" if "outside_engine_p50_ms" in row else "-"
        posts = f"{row['stream_posts_per_s']:.0f}" if "stream_posts_per_s" in row else "-"
        shares = " ".join(f"{group} {share:.0%}" for group, share in row.get("cpu_share", {}).items())
        if row.get("cpu_share", {}).get("emulator", 0) > EMULATOR_BUSY:
            busy_emulator.append(f"{row['path']} {load}")
        lines.append(f"{load:>8s} {row['path']:13s} {row['tok_s']:9.1f} {over:>6s} {row['queue_p50_ms']:8.1f}ms "
                     f"{row['queue_p95_ms']:6.1f}ms {row['ttfc_p50_ms']:7.1f}ms {row['ttfc_p95_ms']:6.1f}ms "
                     f"{ttft:>9s} {handler:>12s} {outside:>8s} {posts:>8s}  {shares}")
    lines += [f"{'c' + str(row['load']):>8s} {row['path']:13s} over HTTP: first -> last text p50 {row['decode_p50_ms']:.1f} ms, "
              f"last text -> end p50 {row['tail_p50_ms']:.2f} ms, {row['text_events_p50']:g} events with text a stream"
              for row in result["summary_bursts"] if "decode_p50_ms" in row]
    if result["poisson_rate_per_s"]:
        lines.append(f"Poisson: {s['poisson_jobs']} jobs at {result['poisson_rate_per_s']} jobs/s "
                     f"({s['poisson_load']} x raw capacity at c{max(s['concurrency'])}), {s['poisson_rounds']} "
                     f"run(s) per path")
    lines.append("p50s; TTFT: raw's first token; handler TTFT: the job's own (handler start -> first token); "
                 "outside: TTFC - queue - handler TTFT, per job; POSTs/s: stream POSTs at the emulator; CPU: "
                 "worker_main = handler.py's process, engine = its children, emulator = the emulator's thread, "
                 "front_end = this process (raw)")
    lines.append(f"emulator above {EMULATOR_BUSY:.0%} of a core (it may have been the limit): "
                 + (", ".join(busy_emulator) if busy_emulator else "none"))
    cold = result["cold_start"]
    lines += ["", f"cold start: raw in-process start_worker {cold['raw_start_worker_s']} s"]
    for name, script in s["worker_scripts"].items():
        if "first_take_s" in cold.get(name, {}):
            lines.append(f"  {name} ({script}): process start -> first job-take "
                         f"{cold[name]['first_take_s']} s, -> first job served {cold[name]['first_job_served_s']} s")
    for label, spy in result.get("py_spy", {}).items():
        lines += ["", f"py-spy of {label}'s main process: {spy.get('samples', 0)} samples ({spy.get('file')})"]
        if "error" in spy:
            lines.append(f"  {spy['error']}")
            continue
        lines.append("  most samples in (inclusive, below the event loop's callback):")
        lines += [f"    {share:6.1%}  {frame[:150]}" for share, frame in spy["inclusive"][:18]]
        lines.append("  on top of the stack (self):")
        lines += [f"    {share:6.1%}  {frame[:150]}" for share, frame in spy["self"][:12]]
    for name, start in cold.items():
        if isinstance(start, dict) and "ready_s" in start:
            lines.append(f"  {name}: process start -> first health answer {start['first_health_answer_s']} s, "
                         f"-> ready (200) {start['ready_s']} s")
    lines += ["", "goals (issue 23 for the platform path, issue 30 for http; set for the H200):"]
    for check in result["goals"]:
        lines.append(f"  {'met   ' if check['met'] else 'MISSED'} {check['goal']} at {check['at']}: {check['value']}")
    return "\n".join(lines)


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 (only a label)
        pass
    return f"CPU: {os.cpu_count()} x {cpu_model()}"


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench platform", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the tiny test model)")
    parser.add_argument("--tokens", type=int, default=256, help="output tokens per job")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64], help="burst sizes")
    parser.add_argument("--rounds", type=int, default=7, help="runs per path and burst size")
    parser.add_argument("--max-concurrency", type=int, default=64, help="MAX_CONCURRENCY of the worker")
    parser.add_argument("--poisson-jobs", type=int, default=256, help="0: no Poisson run")
    parser.add_argument("--poisson-load", type=float, default=0.9, help="arrival rate / raw capacity")
    parser.add_argument("--poisson-rounds", type=int, default=1, help="Poisson runs per path")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.1,
                        help="per engine (two run at once); on CPU the share of RAM")
    parser.add_argument("--worker-script", default="handler.py", help="the worker the platform path runs")
    parser.add_argument("--baseline-worker", default=None,
                        help="another checkout's handler.py, run as a third path (before/after a change)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                        help="the platform path with these variables set, as a path of its own (repeatable)")
    parser.add_argument("--engines", choices=("together", "one-at-a-time"), default="together",
                        help="all engines at once, rounds alternating; or each path's engine alone, in turn")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="MAX_NUM_SEQS of every path")
    parser.add_argument("--http", action="store_true",
                        help="two paths more: this worker over HTTP (PORT) and vllm serve (bench/http_paths.py)")
    parser.add_argument("--http-baseline", default=None, metavar="HANDLER",
                        help="with --http: another checkout's handler.py over HTTP, as a path of its own")
    parser.add_argument("--http-port", type=int, default=18080, help="the first HTTP path's port (the next path: +1)")
    parser.add_argument("--no-queue", action="store_true",
                        help="without the worker through the queue (with --http: raw and the HTTP paths only)")
    parser.add_argument("--py-spy", default=None, metavar="PATH",
                        help="py-spy binary: record the platform worker's main process during a burst")
    parser.add_argument("--spy-at", type=int, default=None, help="the burst py-spy records (default: the largest)")
    parser.add_argument("--spy-seconds", type=int, default=15)
    parser.add_argument("--log-dir", default=None, help="worker logs and py-spy records (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "platform-suite-cpu.json"))
    args = parser.parse_args(argv)
    if max(args.concurrency) > args.max_concurrency:
        parser.error("a burst larger than --max-concurrency would queue in the raw path only")
    try:
        [parse_variant(v) for v in args.variant]
    except ValueError as exc:
        parser.error(str(exc))
    args.spy_at = args.spy_at or max(args.concurrency)
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="platform-suite-"))
    print(f"worker log in {log_dir}", flush=True)
    started = time.monotonic()
    measured = asyncio.run(run_suite(args, log_dir))
    summary_bursts = summarize(measured["bursts"], "concurrency")
    result = {
        "suite": "platform",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "-m", "bench", "platform", *argv]),
        "device": device_name(),
        "versions": versions(),
        "settings": {"model": args.model or "tiny test model (builder/tiny_model.py)", "tokens": args.tokens,
                     "concurrency": args.concurrency, "rounds": args.rounds, "max_concurrency": args.max_concurrency,
                     "poisson_jobs": args.poisson_jobs, "poisson_load": args.poisson_load,
                     "poisson_rounds": args.poisson_rounds, "max_model_len": args.max_model_len,
                     "gpu_memory_utilization": args.gpu_memory_utilization, "engines": args.engines,
                     "max_num_seqs": args.max_num_seqs,
                     "worker_scripts": {"platform": args.worker_script,
                                        **({"baseline": args.baseline_worker} if args.baseline_worker else {}),
                                        **({"http-baseline": args.http_baseline} if args.http_baseline else {}),
                                        **{name: f"{args.worker_script} {' '.join(f'{k}={v}' for k, v in env.items())}"
                                           for name, env in map(parse_variant, args.variant)}},
                     "sampling": "greedy, ignore_eos, streamed", "sdk_log_level": "INFO"},
        "cold_start": measured["cold_start"],
        "summary_bursts": summary_bursts,
        "summary_poisson": summarize(measured["poisson"], None),
        "poisson_rate_per_s": measured["poisson_rate_per_s"],
        "goals": check_goals(summary_bursts, max(args.concurrency)) + http_goals(summary_bursts,
                                                                                 measured["cold_start"]),
        "py_spy": measured["py_spy"],
        "bursts": measured["bursts"],
        "poisson": measured["poisson"],
        "suite_seconds": round(time.monotonic() - started, 1),
    }
    print("\n" + format_report(result), flush=True)
    write_result(result, Path(args.out))


if __name__ == "__main__":
    main()
