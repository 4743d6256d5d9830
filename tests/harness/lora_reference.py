"""vLLM's own answer for LoRA tests: ``LLM.generate`` with a LoRARequest per prompt, in a process of its own.

    python -m tests.harness.lora_reference MODEL_DIR OUT_JSON CASES_JSON

CASES_JSON: a list of [prompt, adapter name or null, adapter folder or null, max_tokens]; OUT_JSON gets the
greedy (ignore_eos) texts in that order, each generated alone.
"""

from __future__ import annotations

import json
import sys


def main(model_dir: str, out: str, cases_json: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    cases = json.loads(cases_json)
    folders = sorted({folder for _, _, folder, _ in cases if folder})
    # One slot more than the adapters, as the worker keeps on CPU (gams_worker/startup/engine.py, lora_kwargs).
    llm = LLM(model=model_dir, enable_lora=True, max_loras=len(folders) + 1, max_lora_rank=16, max_model_len=4096,
              gpu_memory_utilization=0.05, dtype="bfloat16")
    texts = []
    for prompt, name, folder, max_tokens in cases:
        lora = LoRARequest(name, folders.index(folder) + 1, folder) if folder else None
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        texts.append(llm.generate([prompt], params, lora_request=lora, use_tqdm=False)[0].outputs[0].text)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(texts, handle)


if __name__ == "__main__":  # vLLM's engine process re-imports this module as __mp_main__
    main(*sys.argv[1:4])
