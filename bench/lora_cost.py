"""GPU cost of LoRA adapters (issue 32): tok/s of the raw AsyncLLM engine with 0, 1 and 4 adapters in the mix
at 1/32/128 streams of 256 greedy ignore_eos tokens, against the same engine without enable_lora, and the KV
cache each engine has left (what the adapters' slots take), beside what the worker's memory model counts.

    python -m bench.lora_cost session --model DIR --out OUT_DIR   # both engines, one process each; the table
    python -m bench.lora_cost run --model DIR [--adapters DIR] --out result.json   # one engine
    python -m bench.lora_cost table OUT_DIR                        # the table of a session's results

The adapters: 4 of rank 16 on q, k, v, o, gate, up and down with seeded random weights (builder/lora_adapter.py),
written once to ``--adapters`` (default /tmp/gams-loras). Engines: max_num_seqs 256, GPU_MEMORY_UTILIZATION 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from bench.gpu_suite import PROMPT, percentile

ADAPTERS, RANK = 4, 16
# The requests of a mix take these adapters in turn (None: the base model).
MIXES = {"base only": [None], "1 adapter": [0], "4 adapters": [0, 1, 2, 3], "base + 4": [None, 0, 1, 2, 3]}
LOG_LINES = {"kv_gib": r"Available KV cache memory: ([\d.]+) GiB", "kv_tokens": r"KV cache size: ([\d,]+) tokens"}


def build_adapters(model: str, folder: str) -> List[str]:
    """The 4 adapters of ``model`` in ``folder`` (written once)."""
    from builder import lora_adapter

    paths = []
    for index in range(ADAPTERS):
        path = Path(folder) / f"lora-{index}"
        if not (path / "adapter_model.safetensors").is_file():
            lora_adapter.build(model, str(path), rank=RANK, seed=index, base_model=model, scale=0.1)
        paths.append(str(path))
    return paths


async def stream(engine: Any, params: Any, prompt_ids: List[int], lora: Any) -> tuple:
    started, first, tokens = time.perf_counter(), None, 0
    async for output in engine.generate({"prompt_token_ids": prompt_ids}, params, uuid.uuid4().hex,
                                        lora_request=lora):
        count = sum(len(choice.token_ids) for choice in output.outputs)
        if count and first is None:
            first = time.perf_counter() - started
        tokens += count
    return tokens, first, time.perf_counter() - started


async def sweep(engine: Any, loras: List[Any], args: argparse.Namespace) -> List[Dict[str, Any]]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.0,
                            output_kind=RequestOutputKind.DELTA)
    prompt_ids = engine.get_tokenizer().encode(PROMPT)
    mixes = {name: mix for name, mix in MIXES.items() if loras or mix == [None]}
    every = [None] + loras
    await asyncio.gather(*(stream(engine, params, prompt_ids, every[i % len(every)]) for i in range(8)))  # warm-up
    rows = []
    for concurrency in args.concurrency:
        for name, mix in mixes.items():
            chosen = [None if slot is None else loras[slot] for slot in mix]
            started = time.perf_counter()
            runs = await asyncio.gather(*(stream(engine, params, prompt_ids, chosen[i % len(chosen)])
                                          for i in range(concurrency)))
            wall = time.perf_counter() - started
            row = {"engine": "lora" if loras else "no-lora", "mix": name, "concurrency": concurrency,
                   "tok_s": round(sum(run[0] for run in runs) / wall, 1),
                   "ttft_p50_ms": round(1000 * percentile([run[1] for run in runs], 0.5), 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def run(args: argparse.Namespace) -> None:
    """One engine (with LoRA where ``--adapters`` is given), its sweep and its KV cache, into ``--out``."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    paths = build_adapters(args.model, args.adapters) if args.adapters else []
    kwargs = dict(model=args.model, max_model_len=4096, gpu_memory_utilization=args.gpu_memory_utilization,
                  max_num_seqs=256, disable_log_stats=True)
    if paths:
        kwargs.update(enable_lora=True, max_loras=ADAPTERS, max_lora_rank=RANK)
    started = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    start_s = time.perf_counter() - started
    loras = [LoRARequest(f"lora-{index}", index + 1, path) for index, path in enumerate(paths)]
    try:
        rows = asyncio.run(sweep(engine, loras, args))
        cache = engine.vllm_config.cache_config
        result = {"engine": "lora" if paths else "no-lora", "engine_args": kwargs, "start_s": round(start_s, 1),
                  "kv_blocks": cache.num_gpu_blocks, "block_size": cache.block_size, "results": rows}
    finally:
        engine.shutdown()
    Path(args.out).write_text(json.dumps(result, indent=1))


def session(args: argparse.Namespace) -> None:
    """Both engines, each in a process of its own (the GPU whole for each), then the table."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build_adapters(args.model, args.adapters)  # before the clock of either engine
    for name, extra, timeout in (("no-lora", [], args.timeout_s * 0.42), ("lora", ["--adapters", args.adapters],
                                                                          args.timeout_s * 0.52)):
        command = [sys.executable, "-m", "bench.lora_cost", "run", "--model", args.model, "--out",
                   str(out / f"{name}.json"), "--tokens", str(args.tokens), "--gpu-memory-utilization",
                   str(args.gpu_memory_utilization), "--concurrency", *map(str, args.concurrency), *extra]
        with open(out / f"{name}.log", "wb") as log:
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        print(f"== {name}: exit {code}, log {out / f'{name}.log'}", flush=True)
    print(table(out))


def _log_facts(log: Path) -> Dict[str, str]:
    """The KV cache the engine's log reports ("?" where it has no such line)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return {key: (re.findall(pattern, text) or ["?"])[-1] for key, pattern in LOG_LINES.items()}


def table(out: Path) -> str:
    """Markdown: tok/s of each mix and concurrency, x the no-LoRA engine's; each engine's KV cache."""
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in ("no-lora", "lora")
               if (out / f"{name}.json").is_file()}
    reference = {row["concurrency"]: row["tok_s"] for row in results.get("no-lora", {}).get("results", [])}
    lines = ["| engine | mix | streams | tok/s | x no-LoRA | TTFT p50 ms |", "|---|---|---|---|---|---|"]
    for result in results.values():
        for row in result["results"]:
            ratio = row["tok_s"] / reference[row["concurrency"]] if row["concurrency"] in reference else None
            lines.append(f"| {row['engine']} | {row['mix']} | {row['concurrency']} | {row['tok_s']} | "
                         f"{'' if ratio is None else f'{ratio:.3f}'} | {row['ttft_p50_ms']} |")
    lines += ["", "| engine | start s | KV blocks x size | Available KV cache (log) | GPU KV cache size (log) |",
              "|---|---|---|---|---|"]
    facts = {name: _log_facts(out / f"{name}.log") for name in ("no-lora", "lora")}
    for name in ("no-lora", "lora"):
        result = results.get(name, {})
        lines.append(f"| {name} | {result.get('start_s')} | {result.get('kv_blocks')} x {result.get('block_size')} | "
                     f"{facts[name]['kv_gib']} GiB | {facts[name]['kv_tokens']} tokens |")
    if "?" not in (facts["no-lora"]["kv_gib"], facts["lora"]["kv_gib"]):
        lost = float(facts["no-lora"]["kv_gib"]) - float(facts["lora"]["kv_gib"])
        lines += ["", f"KV cache the LoRA engine has less: {lost:.2f} GiB."]
    return "\n".join(lines + ["", _memory_model_line()])


def _memory_model_line() -> str:
    from gams_worker.memory import GIB
    from gams_worker.presets import GEMMA2_9B

    counted = GEMMA2_9B.memory(0, lora_ranks=ADAPTERS * RANK).adapter_bytes
    return (f"The worker's memory model counts {counted / GIB:.3f} GiB for {ADAPTERS} adapter slots at rank {RANK} "
            f"(MAX_LORAS={ADAPTERS}, MAX_LORA_RANK={RANK}) on GaMS-9B; compare the drop in available KV cache above.")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("session", "run", "table"))
    parser.add_argument("--model", default="/tmp/gams-9b-shaped")
    parser.add_argument("--adapters", default=None, help="adapters' folder (session: default /tmp/gams-loras)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--timeout-s", type=float, default=520, help="session: both engines' processes together")
    args = parser.parse_args(argv)
    if args.step == "session":
        args.adapters = args.adapters or "/tmp/gams-loras"
        session(args)
    elif args.step == "run":
        run(args)
    else:
        print(table(Path(args.out)))


if __name__ == "__main__":  # vLLM's engine process re-imports this module as __mp_main__
    main()
