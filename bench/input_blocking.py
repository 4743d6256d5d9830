"""A long prompt beside 32 streams: how long the other jobs' chunks wait while it is prepared.

    .venv/bin/python -m bench input-blocking [--streams 32] [--prompt-chars 200000] [--model DIR]

One worker in this process (the tiny model unless ``--model``), jobs run through its JobDispatch as
the handler runs them. ``--streams`` plain streaming jobs generate; once every one streams, a plain
job with a long prompt arrives (``--prompt-chars`` characters of Slovene, MAX_PROMPT_CHARS by
default: the longest the defaults allow; it has more tokens than MAX_MODEL_LEN, so its job ends as
soon as it is tokenized). Its validation, chat template and tokenization run

- ``on the loop``: PlainJobs._prepare called on the event loop, as every plain job was
  prepared before this change;
- ``in its thread``: through PlainJobs as it runs now.

For each, the largest gap between two chunks of any stream whose later chunk arrived while the
long job was being prepared, beside the largest gap in the second just before it, side by side
in one run. Chunks are flushed every 16 tokens or 100 ms (STREAM_BATCH_*), so a
gap well above 0.1 s is a stream that waited.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any, Dict, List, Optional, Tuple

from gams_worker.errors import JobInputError


async def stream(jobs: Any, job_id: str, prompt: str, tokens: int, times: List[float]) -> None:
    job = {"id": job_id, "input": {"prompt": prompt, "stream": True,
                                   "sampling_params": {"max_tokens": tokens, "ignore_eos": True, "temperature": 0}}}
    async for _ in jobs.run(job):
        times.append(time.monotonic())


def largest_gap(streams: List[List[float]], start: float, end: float) -> float:
    """The largest gap between consecutive chunks of any stream whose later chunk came in [start, end]."""
    gaps = [b - a for times in streams for a, b in zip(times, times[1:]) if start <= b <= end]
    return max(gaps, default=0.0)


async def long_job(worker: Any, prompt: str, on_loop: bool) -> Tuple[float, float]:
    """(arrived, prepared) times of the long prompt's job, prepared on the loop or as PlainJobs does it."""
    raw = {"prompt": prompt, "stream": True}
    arrived = time.monotonic()
    if on_loop:
        try:
            worker.jobs.plain._prepare(raw)  # what run() did inline before: parse, template, tokenize
        except JobInputError:
            pass
    else:
        outputs = [output async for output in worker.jobs.run({"id": "long", "input": raw})]
        assert "error" in outputs[-1], "the long prompt must not fit MAX_MODEL_LEN: use more --prompt-chars"
    return arrived, time.monotonic()


async def measure(worker: Any, args: argparse.Namespace) -> Dict[str, Any]:
    times: List[List[float]] = [[] for _ in range(args.streams)]
    tasks = [asyncio.create_task(stream(worker.jobs, f"s{i}", f"Ljubljana {i}", args.tokens, times[i]))
             for i in range(args.streams)]
    deadline = time.monotonic() + 300
    while not all(len(t) >= 3 for t in times):
        assert time.monotonic() < deadline, "the streams did not start"
        await asyncio.sleep(0.05)
    prompt = ("Ljubljana je lepa. Čebele, žganci in Triglav. " * (args.prompt_chars // 46 + 1))[:args.prompt_chars]
    results = {}
    for mode, on_loop in (("on the loop", True), ("in its thread", False)):
        await asyncio.sleep(1.0)  # settle
        arrived, prepared = await long_job(worker, prompt, on_loop)
        await asyncio.sleep(0.3)  # the chunk that waited arrives after the preparation
        took = prepared - arrived
        during = largest_gap(times, arrived, prepared + 0.3)
        before = largest_gap(times, arrived - 0.9, arrived)  # the settling second, after the previous run
        results[mode] = {"prepare_s": round(took, 3), "gap_during_s": round(during, 3), "gap_before_s": round(before, 3)}
    running = sum(not task.done() for task in tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert running == args.streams, f"only {running} of {args.streams} streams ran through both measurements"
    tokens = len(worker.tokenizer.encode(prompt))
    return {"prompt_chars": len(prompt), "prompt_tokens": tokens, **results}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench input-blocking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, default=200_000)
    parser.add_argument("--tokens", type=int, default=3000, help="output tokens per stream (they must outlast both runs)")
    parser.add_argument("--model", default=None, help="model directory (default: the tiny model)")
    args = parser.parse_args(argv)

    from builder import tiny_model
    from gams_worker.config import load_config
    from gams_worker.worker import setup_logging, start_worker
    from tests.harness.worker_process import engine_env

    config = load_config(engine_env(args.model or str(tiny_model.build()), MAX_MODEL_LEN="4096",
                                    MAX_PROMPT_CHARS=str(max(args.prompt_chars, 200_000)),
                                    MAX_INPUT_BYTES=str(max(4 * args.prompt_chars, 1_048_576)),
                                    ENFORCE_EAGER="true", LOG_LEVEL="WARNING"))
    setup_logging(config)
    worker = start_worker(config)
    try:
        result = asyncio.run(measure(worker, args))
    finally:
        worker.close()
    print(f"[input blocking] a {result['prompt_chars']}-character prompt ({result['prompt_tokens']} tokens) "
          f"beside {args.streams} streams; the streams' largest chunk gap:")
    for mode in ("on the loop", "in its thread"):
        r = result[mode]
        print(f"  prepared {mode:13}: {r['prepare_s']:.3f} s to prepare; largest gap while it was prepared "
              f"{r['gap_during_s']:.3f} s (just before: {r['gap_before_s']:.3f} s)")
    on_loop, threaded = result["on the loop"]["gap_during_s"], result["in its thread"]["gap_during_s"]
    print(f"  ratio of the largest gaps, on the loop / in its thread: {on_loop / max(threaded, 1e-3):.1f}x")
