"""Handler overhead on CPU: N concurrent streamed jobs through the handler vs. the raw engine.

    .venv/bin/python -m bench.handler_vs_raw [--jobs 32] [--tokens 128] [--rounds 21]

One engine (the tiny GaMS-shaped model on vLLM's CPU build) serves both paths;
rounds alternate raw / handler so that drift on a busy machine hits both alike.
Prints aggregate tokens/s per round, the medians, and handler / raw.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import handler
from builder import tiny_model
from gams_worker.config import load_config
from gams_worker.worker import setup_logging, start_worker

PROMPTS = ["Ljubljana", "Triglav je", "Slovenija meji", "Vreme bo jutri", "Kaj je glavno mesto Slovenije?",
           "Prešeren je napisal", "Čebelarstvo ima", "Language models can"]


async def raw_round(engine, jobs: int, tokens: int) -> int:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def one(i: int) -> int:
        count = 0
        async for output in engine.generate({"prompt": PROMPTS[i % len(PROMPTS)]}, params, uuid.uuid4().hex):
            count += sum(len(c.token_ids) for c in output.outputs)
        return count

    return sum(await asyncio.gather(*(one(i) for i in range(jobs))))


async def handler_round(jobs: int, tokens: int) -> int:
    async def one(i: int) -> int:
        job = {"id": f"bench-{i}", "input": {"prompt": PROMPTS[i % len(PROMPTS)], "stream": True,
                                             "sampling_params": {"max_tokens": tokens, "temperature": 0.0,
                                                                 "ignore_eos": True}}}
        last = None
        async for output in handler.handler(job):
            last = output
        return last["usage"]["completion_tokens"]

    return sum(await asyncio.gather(*(one(i) for i in range(jobs))))


async def measure(engine, args) -> None:
    await raw_round(engine, args.jobs, 8)  # warm-up: first requests pay one-time costs
    await handler_round(args.jobs, 8)
    rates = {"raw": [], "handler": []}
    for r in range(args.rounds):
        for path in ("raw", "handler"):
            started = time.perf_counter()
            if path == "raw":
                tokens = await raw_round(engine, args.jobs, args.tokens)
            else:
                tokens = await handler_round(args.jobs, args.tokens)
            seconds = time.perf_counter() - started
            assert tokens == args.jobs * args.tokens, tokens
            rates[path].append(tokens / seconds)
            print(f"round {r + 1} {path:8s} {tokens} tokens in {seconds:6.2f} s = {tokens / seconds:8.1f} tok/s", flush=True)
    raw, through_handler = statistics.median(rates["raw"]), statistics.median(rates["handler"])
    print(f"\n{args.jobs} concurrent streamed jobs x {args.tokens} tokens, median of {args.rounds} rounds")
    print(f"raw engine : {raw:8.1f} tok/s")
    print(f"handler    : {through_handler:8.1f} tok/s")
    print(f"handler/raw: {through_handler / raw:.3f}  (target >= 0.97)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    config = load_config({"MODEL_NAME": str(tiny_model.build()), "MAX_MODEL_LEN": "512",
                          "GPU_MEMORY_UTILIZATION": "0.2", "LOG_LEVEL": "WARNING"})
    setup_logging(config)
    worker = start_worker(config)
    handler.service = worker.service
    try:
        asyncio.run(measure(worker.service.engine, args))
    finally:
        worker.close()


if __name__ == "__main__":
    main()
