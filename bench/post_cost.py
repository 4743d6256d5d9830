"""What one stream POST costs the worker's event loop: the SDK's path against the worker's own.

    .venv/bin/python -m bench posts [--jobs 1 64 512] [--chunks 40] [--rounds 3]

``c`` jobs at once, each a handler (an async generator, as handler.py's) yielding ``--chunks``
outputs shaped like the worker's stream chunks (~16 Slovene tokens of text; the last with usage),
run through (a) the runpod SDK's ``rp_job.handle_job`` (runpod 1.12.0: stream_result, send_result,
an aiohttp_retry RetryClient per post) and (b) ``gams_worker/platform/poster.py``, on the SDK's
keep-alive session, against the RunPod emulator in a process of its own (tests/harness/runpod_emulator.py),
so that only the posting side counts in this process's CPU time. Paths alternate, ``--rounds`` each.

Prints POSTs a second and this process's CPU time per POST (stream and result posts), and what a
budget of ``--budget`` stream POSTs a second (STREAM_POSTS_PER_SECOND) costs the loop at that price:
the figure the budget's default comes from (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

from bench.cpu_suite import ROOT
from tests.harness.worker_process import free_port

TEXT = " Ljubljana je glavno mesto Slovenije, čebele in žganci"  # ~16 tokens of the tiny model's kind


class Emulator:
    """The RunPod emulator in a process of its own."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.harness.runpod_emulator", "--port", str(self.port)],
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.proc.stdout.readline()  # "RunPod emulator on ...": serving
        self.api = f"http://127.0.0.1:{self.port}/v2/gams-emulated"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def submit(session, api: str) -> str:
    async with session.post(f"{api}/run", json={"input": {}}) as response:
        return (await response.json())["id"]


def handler_of(chunks: int):
    async def handler(job):
        for i in range(chunks - 1):
            yield {"choices": [{"index": 0, "text": TEXT}]}
        yield {"choices": [{"index": 0, "text": "", "finish_reason": "length"}],
               "usage": {"prompt_tokens": 5, "completion_tokens": 16 * chunks, "time_to_first_token_s": 0.02,
                         "total_time_s": 1.0, "tokens_per_second": 640.0},
               "model": "cjvt/GaMS-9B-Instruct", "engine": {"mode": "full", "reason": "default"}}
    return handler


async def one_round(path: str, emulator: Emulator, jobs: int, chunks: int) -> Dict[str, float]:
    from runpod.http_client import AsyncClientSession
    from runpod.serverless.modules import rp_http, rp_job

    from gams_worker.platform.poster import ResultPoster

    config = {"handler": handler_of(chunks), "return_aggregate_stream": True}
    stream_url, done_url = f"{emulator.api}/job-stream/w/$ID?gpu=x", f"{emulator.api}/job-done/w/$ID?gpu=x"
    rp_http.JOB_STREAM_URL, rp_http.JOB_DONE_URL = stream_url, done_url  # the SDK reads them as globals
    poster = ResultPoster(stream_url, done_url)
    async with AsyncClientSession() as session:  # the SDK's session, as the job loop passes it
        ids = [await submit(session, emulator.api) for _ in range(jobs)]

        async def run(job_id: str) -> None:
            job = {"id": job_id, "input": {}}
            if path == "sdk":
                await rp_job.handle_job(session, config, job)
            else:
                await poster.run_job(session, config, job)

        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.gather(*(run(job_id) for job_id in ids))
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    posts = jobs * (chunks + 1)
    return {"posts_per_s": posts / wall, "cpu_ms_per_post": 1000 * cpu / posts, "loop_busy": cpu / wall}


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench posts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 64, 512], help="jobs posting at once")
    parser.add_argument("--chunks", type=int, default=40, help="stream chunks per job")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=None,
                        help="STREAM_POSTS_PER_SECOND to price (default: the worker's)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")  # as the image sets it; read when runpod is imported
    from gams_worker.config import WorkerConfig

    budget = args.budget or WorkerConfig().stream_posts_per_second
    emulator = Emulator()
    rows: List[Dict[str, Any]] = []
    try:
        for jobs in args.jobs:
            for r in range(args.rounds):
                for path in (("sdk", "lean") if r % 2 == 0 else ("lean", "sdk")):
                    figures = asyncio.run(one_round(path, emulator, jobs, args.chunks))
                    rows.append({"path": path, "jobs": jobs, "round": r + 1, **figures})
    finally:
        emulator.close()
    print(f"{'jobs':>5s} {'path':5s} {'POSTs/s':>8s} {'CPU ms/POST':>12s} {'loop busy':>10s} "
          f"{'loop share at ' + str(budget) + '/s':>20s}")
    summary = []
    for jobs in args.jobs:
        for path in ("sdk", "lean"):
            mine = [row for row in rows if row["jobs"] == jobs and row["path"] == path]
            cost = statistics.median(row["cpu_ms_per_post"] for row in mine)
            rate = statistics.median(row["posts_per_s"] for row in mine)
            busy = statistics.median(row["loop_busy"] for row in mine)
            summary.append({"jobs": jobs, "path": path, "posts_per_s": round(rate), "cpu_ms_per_post": round(cost, 3),
                            "loop_share_at_budget": round(budget * cost / 1000, 3)})
            print(f"{jobs:5d} {path:5s} {rate:8.0f} {cost:12.3f} {busy:10.0%} {budget * cost / 1000:20.1%}")
    print("median of rounds; CPU: this process only (the emulator runs in its own); loop busy: CPU / wall "
          "(under 100 %: the emulator, not the poster, was the limit)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"budget": budget, "chunks": args.chunks, "summary": summary, "rounds": rows}, handle, indent=1)
