"""GPU benchmark of one graph mode: engine start, decode vs. the memory roofline, concurrency sweep.

    python -m bench.gpu_suite bandwidth                      # device copy bandwidth (GB/s)
    python -m bench.gpu_suite run --model DIR --mode full --out result.json [--quantization fp8]

``run`` starts vLLM's async engine in the given graph mode, then for each
concurrency sends that many streamed requests of ``--tokens`` tokens with
``ignore_eos``, alternating the raw engine and the handler on the same engine.
It prints one line per measurement and writes everything to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path

PROMPT = "Kaj je vredno videti v Ljubljani? Opiši grad, Tromostovje in tržnico."


def copy_bandwidth_gbs(gib: int = 4, repeats: int = 20) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    import torch

    src = torch.empty(gib * 2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * repeats / (time.perf_counter() - started) / 1e9


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def raw_request(engine, params, prompt_ids):
    started = time.perf_counter()
    first = None
    tokens = 0
    async for output in engine.generate({"prompt_token_ids": prompt_ids}, params, uuid.uuid4().hex):
        n = sum(len(c.token_ids) for c in output.outputs)
        if n and first is None:
            first = time.perf_counter() - started
        tokens += n
    return tokens, first, time.perf_counter() - started


async def handler_request(handler, tokens):
    job = {"id": uuid.uuid4().hex, "input": {"prompt": PROMPT, "stream": True,
                                             "sampling_params": {"max_tokens": tokens, "ignore_eos": True,
                                                                 "temperature": 0.0}}}
    started = time.perf_counter()
    first = None
    last = None
    async for output in handler(job):
        if first is None:
            first = time.perf_counter() - started
        last = output
    return last["usage"]["completion_tokens"], first, time.perf_counter() - started


async def sweep(worker, args):
    import handler
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    handler.worker = worker
    prompt_ids = worker.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.0,
                            output_kind=RequestOutputKind.DELTA)
    await asyncio.gather(*(raw_request(worker.engine, params, prompt_ids) for _ in range(4)))  # warm-up
    results = []
    for concurrency in args.concurrency:
        for path in ("raw", "handler"):
            started = time.perf_counter()
            if path == "raw":
                runs = await asyncio.gather(*(raw_request(worker.engine, params, prompt_ids)
                                              for _ in range(concurrency)))
            else:
                runs = await asyncio.gather(*(handler_request(handler.handler, args.tokens)
                                              for _ in range(concurrency)))
            wall = time.perf_counter() - started
            tokens = sum(r[0] for r in runs)
            ttfts = [r[1] for r in runs]
            decode = [(r[0] - 1) / (r[2] - r[1]) for r in runs]  # per-stream tokens/s after the first
            row = {"path": path, "concurrency": concurrency, "tokens": tokens, "seconds": round(wall, 3),
                   "tok_s": round(tokens / wall, 1), "ttft_p50_ms": round(1000 * percentile(ttfts, 0.5), 1),
                   "ttft_p95_ms": round(1000 * percentile(ttfts, 0.95), 1),
                   "stream_decode_tok_s": round(statistics.median(decode), 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def run(args) -> None:
    from gams_worker.config import load_config
    from gams_worker.engine_info import EngineInfo
    from gams_worker.startup.engine import start_engine
    from gams_worker.startup.host import platform_name
    from gams_worker.worker import Worker, setup_logging

    env = {"MODEL_NAME": args.model, "MAX_MODEL_LEN": str(args.max_model_len), "LOG_LEVEL": "INFO",
           "GPU_MEMORY_UTILIZATION": str(args.gpu_memory_utilization),
           "TENSOR_PARALLEL_SIZE": str(args.tensor_parallel_size)}
    if args.quantization:
        env["QUANTIZATION"] = args.quantization
    if args.max_num_seqs:
        env["MAX_NUM_SEQS"] = str(args.max_num_seqs)
    env["MAX_CONCURRENCY"] = str(max(args.concurrency))
    config = load_config(env)
    setup_logging(config)
    started = time.perf_counter()
    engine = start_engine(config, args.mode, args.model)
    start_seconds = time.perf_counter() - started
    info = EngineInfo(args.mode, "benchmark", platform_name(), round(start_seconds, 2))
    worker = Worker(engine, config, info)
    try:
        results = asyncio.run(sweep(worker, args))
    finally:
        worker.close()
    weights = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    summary = {"mode": args.mode, "quantization": args.quantization, "tensor_parallel_size": args.tensor_parallel_size,
               "max_num_seqs": args.max_num_seqs,
               "engine_start_s": round(start_seconds, 1),
               "weight_bytes": weights, "results": results}
    batch1 = next(r for r in results if r["path"] == "raw" and r["concurrency"] == 1)
    if args.bandwidth_gbs:
        roofline = args.bandwidth_gbs * 1e9 / weights
        summary["roofline_tok_s"] = round(roofline, 1)
        summary["batch1_vs_roofline"] = round(batch1["stream_decode_tok_s"] / roofline, 3)
    for c in sorted({r["concurrency"] for r in results}):
        raw = next(r for r in results if r["path"] == "raw" and r["concurrency"] == c)
        hdl = next(r for r in results if r["path"] == "handler" and r["concurrency"] == c)
        summary[f"handler_over_raw_c{c}"] = round(hdl["tok_s"] / raw["tok_s"], 3)
    print("SUMMARY " + json.dumps({k: v for k, v in summary.items() if k != "results"}), flush=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bandwidth")
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--mode", choices=("full", "piecewise", "eager"), default="full")
    r.add_argument("--quantization", default=None)
    r.add_argument("--max-model-len", type=int, default=4096)
    r.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    r.add_argument("--tensor-parallel-size", type=int, default=1)
    r.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM's")
    r.add_argument("--tokens", type=int, default=256)
    r.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    r.add_argument("--bandwidth-gbs", type=float, default=None)
    r.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "bandwidth":
        print(f"copy bandwidth (read + write): {copy_bandwidth_gbs():.0f} GB/s")
    else:
        run(args)


if __name__ == "__main__":
    main()
