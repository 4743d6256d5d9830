"""Where a batch-1 decode step's time goes on the GPU, against the weight-read roofline.

    python -m bench.gpu_profile --model DIR [--bandwidth-gbs 3019] [--tokens 64] --out profile.json

1. Each weight matrix of the checkpoint multiplied by one token's activations, alone
   (``F.linear`` at batch 1, CUDA events): the best a decode step's matrix products can do.
2. vLLM's engine (default graph mode) under the torch profiler for ``--tokens`` decode
   steps of one request: kernel time per step by kind, and the GPU idle time between kernels.
Prints a breakdown and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import gzip
import json
import os
import re
import tempfile
import time
import uuid
from collections import defaultdict

KINDS = (  # first match wins; kernel names of cuBLAS/CUTLASS, FlashAttention 3, Triton, torch
    ("matmul", re.compile(r"gemm|gemv|cutlass|nvjet|xmma|matmul|splitK|dot", re.I)),
    ("attention", re.compile(r"flash|fmha|attn|attention", re.I)),
    ("sampling", re.compile(r"argmax|sort|topk|top_k|sampl|softmax|gumbel|multinomial|logit", re.I)),
    ("norm_activation_rope", re.compile(r"norm|rms|gelu|silu|act|rotary|rope|tanh|cap", re.I)),
)


def linear_bound_ms(model_dir: str, repeats: int = 50) -> dict:
    """Batch-1 F.linear over every 2-D weight once (per decode step), timed on the GPU."""
    import torch
    import torch.nn.functional as F
    from safetensors import safe_open

    shapes = defaultdict(int)  # (out, in) -> how many matrices of that shape
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                if len(shape) == 2:
                    shapes[shape] += 1
    total_ms, total_bytes = 0.0, 0
    per_shape = []
    for (out_dim, in_dim), count in sorted(shapes.items()):
        weight = torch.randn(out_dim, in_dim, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(1, in_dim, dtype=torch.bfloat16, device="cuda")
        for _ in range(5):
            F.linear(x, weight)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            F.linear(x, weight)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / repeats
        nbytes = weight.numel() * 2
        per_shape.append({"shape": [out_dim, in_dim], "count": count, "ms_each": round(ms, 4),
                          "read_gbs": round(nbytes / ms / 1e6, 1)})
        total_ms += ms * count
        total_bytes += nbytes * count
        del weight
    torch.cuda.empty_cache()
    return {"ms_per_step": round(total_ms, 3), "weight_gb": round(total_bytes / 1e9, 3),
            "read_gbs": round(total_bytes / total_ms / 1e6, 1), "per_shape": per_shape}


def kernel_breakdown(trace_dir: str, steps: int) -> dict:
    """Kernel time by kind per decode step, and GPU idle time, from the worker's trace."""
    paths = [p for p in glob.glob(os.path.join(trace_dir, "**", "*.json*"), recursive=True)
             if "async_llm" not in os.path.basename(p).lower()]
    if not paths:
        raise SystemExit(f"no profiler trace under {trace_dir}: {os.listdir(trace_dir)}")
    path = max(paths, key=os.path.getsize)
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel" and "dur" in e), key=lambda e: e["ts"])
    by_kind, by_name = defaultdict(float), defaultdict(float)
    for e in kernels:
        kind = next((k for k, pattern in KINDS if pattern.search(e["name"])), "other")
        by_kind[kind] += e["dur"]
        by_name[e["name"][:90]] += e["dur"]
    busy_us = sum(e["dur"] for e in kernels)
    span_us = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    per_step = lambda us: round(us / steps / 1000, 3)  # noqa: E731
    return {
        "trace": os.path.basename(path),
        "kernels": len(kernels),
        "kernels_per_step": round(len(kernels) / steps, 1),
        "span_ms_per_step": per_step(span_us),
        "busy_ms_per_step": per_step(busy_us),
        "idle_ms_per_step": per_step(span_us - busy_us),
        "by_kind_ms_per_step": {k: per_step(v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms_per_step": {k: per_step(v) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]},
    }


async def profile_engine(model_dir: str, tokens: int, trace_dir: str) -> dict:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=model_dir, dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.9,
        profiler_config={"profiler": "torch", "torch_profiler_dir": trace_dir, "torch_profiler_with_stack": False,
                         "torch_profiler_dump_cuda_time_total": False, "ignore_frontend": True},
    ))
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0)

    async def one() -> float:
        started = time.perf_counter()
        async for _ in engine.generate({"prompt_token_ids": [2, 651, 1234, 88, 7]}, params, uuid.uuid4().hex):
            pass
        return time.perf_counter() - started

    try:
        await one()
        unprofiled_s = await one()
        await engine.start_profile()
        profiled_s = await one()
        await engine.stop_profile()
        await asyncio.sleep(5)  # the trace is written by the engine process
    finally:
        engine.shutdown()
    return {"tokens": tokens, "unprofiled_tok_s": round(tokens / unprofiled_s, 1),
            "profiled_tok_s": round(tokens / profiled_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--bandwidth-gbs", type=float, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"linear_bound": linear_bound_ms(args.model)}
    print("batch-1 F.linear over all weights:", json.dumps({k: v for k, v in result["linear_bound"].items()
                                                            if k != "per_shape"}), flush=True)
    trace_dir = tempfile.mkdtemp(prefix="vllm-profile-")
    result["engine"] = asyncio.run(profile_engine(args.model, args.tokens, trace_dir))
    result["engine"].update(kernel_breakdown(trace_dir, args.tokens))
    if args.bandwidth_gbs:
        gb = result["linear_bound"]["weight_gb"]
        result["roofline_ms_per_step"] = round(gb / args.bandwidth_gbs * 1000, 3)
    print(json.dumps(result, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
