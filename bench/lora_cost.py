"""LoRA's cost on the GPU (issue 32), the raw vLLM engine on the GaMS-9B-shaped model.

    python -m bench.lora_cost --model DIR --out FILE.json

Writes four rank-16 PEFT adapters (builder/lora_adapter.py: every linear layer, seeded random weights), then in one child
process per engine: the engine without LoRA, and with enable_lora (max_loras 4, max_lora_rank 16) serving
base requests only, one adapter, and four adapters round-robin, each at 1/32/128 concurrent 256-token
greedy streams. Prints tok/s, the ratio to the engine without LoRA, and each engine's KV cache (tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

from builder import lora_adapter

RANK = 16
ADAPTERS = 4
CONCURRENCY = tuple(int(c) for c in os.environ.get("LORA_BENCH_CONCURRENCY", "1,32,128").split(","))
TOKENS = int(os.environ.get("LORA_BENCH_TOKENS", "256"))
PROMPT = "Kaj je vredno videti v Ljubljani?"
KV_LINE = re.compile(r"(?:GPU|CPU) KV cache size: ([\d,]+) tokens")


async def stream(engine: Any, params: Any, prompt_ids: List[int], lora: Any) -> int:
    tokens = 0
    async for output in engine.generate({"prompt_token_ids": prompt_ids}, params, uuid.uuid4().hex,
                                        lora_request=lora):
        tokens += len(output.outputs[0].token_ids)
    return tokens


async def sweep(engine: Any, mixes: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True, temperature=0.0, output_kind=RequestOutputKind.DELTA)
    prompt_ids = engine.get_tokenizer().encode(PROMPT)
    rows = []
    for mix, loras in mixes.items():
        await asyncio.gather(*(stream(engine, params, prompt_ids, lora) for lora in loras))  # warm-up, adapters loaded
        for concurrency in CONCURRENCY:
            started = time.perf_counter()
            counts = await asyncio.gather(*(stream(engine, params, prompt_ids, loras[i % len(loras)])
                                            for i in range(concurrency)))
            row = {"mix": mix, "concurrency": concurrency,
                   "tok_s": round(sum(counts) / (time.perf_counter() - started), 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def engine_child(model: str, adapters: List[str], lora: bool, overrides: Dict[str, Any]) -> None:
    """One engine in this process: its sweep, as JSON lines on stdout."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = dict(model=model, max_model_len=4096, gpu_memory_utilization=0.90, max_num_seqs=512, dtype="bfloat16")
    if lora:
        kwargs.update(enable_lora=True, max_loras=ADAPTERS, max_lora_rank=RANK)
    kwargs.update(overrides)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    requests = [LoRARequest(f"adapter-{i}", i + 1, path) for i, path in enumerate(adapters)]
    mixes = {"no LoRA engine": [None]}
    if lora:
        mixes = {"base only": [None], "1 adapter": requests[:1], f"{ADAPTERS} adapters": requests}
    try:
        rows = asyncio.run(sweep(engine, mixes))
    finally:
        engine.shutdown()
    print("ROWS " + json.dumps(rows), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--child", choices=("lora", "plain"))
    parser.add_argument("--adapters", nargs="*", default=[])
    parser.add_argument("--engine-args", default="{}", help="JSON overrides (a CPU smoke run)")
    args = parser.parse_args()
    if args.child:
        engine_child(args.model, args.adapters, args.child == "lora", json.loads(args.engine_args))
        return 0
    started = time.perf_counter()
    adapters = [str(lora_adapter.build(args.model, f"/tmp/lora-adapters/adapter-{i}", rank=RANK, seed=i))
                for i in range(ADAPTERS)]
    print(f"adapters written in {time.perf_counter() - started:.1f} s", flush=True)
    summary: Dict[str, Any] = {"rank": RANK, "adapters": ADAPTERS, "rows": [], "kv_cache_tokens": {}}
    for child in ("plain", "lora"):
        log = args.out.with_name(f"lora-cost-{child}.log")
        with open(log, "w") as handle:
            subprocess.run([sys.executable, "-m", "bench.lora_cost", "--model", args.model, "--out", str(args.out),
                            "--child", child, "--engine-args", args.engine_args, "--adapters", *adapters], stdout=handle, stderr=subprocess.STDOUT)
        text = log.read_text(errors="replace")
        kv = KV_LINE.findall(text)
        summary["kv_cache_tokens"][child] = int(kv[-1].replace(",", "")) if kv else None
        rows = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("ROWS ")]
        if not rows:
            print(f"{child}: no results; the log's end:\n{text[-3000:]}", flush=True)
            continue
        summary["rows"] += rows[0]
    reference = {row["concurrency"]: row["tok_s"] for row in summary["rows"] if row["mix"] == "no LoRA engine"}
    for row in summary["rows"]:
        if row["concurrency"] in reference:
            row["x_no_lora"] = round(row["tok_s"] / reference[row["concurrency"]], 3)
        print(json.dumps(row))
    print("KV cache tokens: " + json.dumps(summary["kv_cache_tokens"]))
    args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
