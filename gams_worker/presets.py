"""Settings presets for the GaMS chat models: weights, context and config.json facts, data only.

A preset fills only settings the environment left unset (gams_worker/startup/plan.py);
``python -m gams_worker.presets`` prints MAINTAINERS.md's table ("GaMS presets: facts read and assumed").
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

from gams_worker.memory import GIB, HEADROOM_BYTES, Architecture, lora_params_per_rank

GEMMA2_2B = Architecture("Gemma 2 2B", 26, 13, 4, 256, 4096, 8192, "config.json (builder/shaped_model.py)",
                         256000 * 2304, lora_params_per_rank(26, 2304, 8, 4, 256, 9216))
GEMMA2_9B = Architecture("Gemma 2 9B", 42, 21, 8, 256, 4096, 8192, "config.json of GaMS-9B-Instruct", 256000 * 3584,
                         lora_params_per_rank(42, 3584, 16, 8, 256, 14336))
GEMMA2_27B = Architecture("Gemma 2 27B", 46, 23, 16, 128, 4096, 8192, "config.json of GaMS-27B-Instruct",
                          256000 * 4608, lora_params_per_rank(46, 4608, 32, 16, 128, 36864))
# Assumed, not read (MAINTAINERS.md, "Facts read, facts assumed"): GaMS2-27B's layers and GaMS3's counts.
GAMS2_27B = dataclasses.replace(GEMMA2_27B, max_positions=None,
                                source="assumed: GaMS-27B's architecture (config.json not readable here)")
GEMMA3_12B = Architecture("Gemma 3 12B (text)", 48, 40, 8, 256, 1024, 131072,
                          "config.json of GaMS3-12B-Instruct / -Lex, partly assumed from Gemma 3 12B", 262208 * 3840,
                          lora_params_per_rank(48, 3840, 16, 8, 256, 15360))


@dataclasses.dataclass(frozen=True)
class Preset:
    weights_gib: float  # bf16 weights, as vLLM reports "Model loading took"
    max_model_len: int
    gpu_memory_utilization: float = 0.90
    dtype: str = "bfloat16"
    architecture: Optional[Architecture] = None


# Chat models only: the base models have no chat template. Why 8192: MAINTAINERS.md's preset table.
PRESETS: Dict[str, Preset] = {
    "cjvt/gams-2b-instruct": Preset(4.9, 8192, architecture=GEMMA2_2B),
    "cjvt/gams-9b-instruct": Preset(17.2, 8192, architecture=GEMMA2_9B),
    "cjvt/gams-9b-instruct-nemotron": Preset(17.2, 8192, architecture=GEMMA2_9B),
    "cjvt/gams-9b-instruct-lex": Preset(17.2, 8192, architecture=GEMMA2_9B),
    "cjvt/gams-dpo-translator": Preset(17.2, 8192, architecture=GEMMA2_9B),
    "cjvt/gams-27b-instruct": Preset(50.7, 8192, architecture=GEMMA2_27B),
    "cjvt/gams-27b-instruct-nemotron": Preset(50.7, 8192, architecture=GEMMA2_27B),
    "cjvt/gams2-27b-instruct": Preset(50.8, 8192, architecture=GAMS2_27B),
    "cjvt/gams2-27b-grpo-translator": Preset(50.8, 8192, architecture=GAMS2_27B),
    "cjvt/gams3-12b-instruct": Preset(22.7, 8192, architecture=GEMMA3_12B),
    "cjvt/gams3-12b-instruct-lex": Preset(22.7, 8192, architecture=GEMMA3_12B),
    "cjvt/gams3-12b-grpo-translator": Preset(22.7, 8192, architecture=GEMMA3_12B),
}


def preset_for(model_name: str) -> Optional[Preset]:
    """The preset of a GaMS repo id (case-insensitive), or None for other models."""
    return PRESETS.get(model_name.strip().rstrip("/").lower())


def choose_tensor_parallel(weights_gib: float, gpu_count: int, gpu_memory_gib: float, utilization: float) -> int:
    """Fewest GPUs (a power of two, at most ``gpu_count``) that hold the weights plus headroom."""
    size = 1
    while size * 2 <= max(gpu_count, 1):
        if weights_gib * GIB / size + HEADROOM_BYTES <= gpu_memory_gib * GIB * utilization:
            break
        size *= 2
    return size


def preset_table() -> str:
    """MAINTAINERS.md's preset table: one row per architecture and preset settings (per card: README's cards)."""
    groups: Dict[Tuple[Architecture, float, int], list] = {}
    for name, preset in PRESETS.items():
        groups.setdefault((preset.architecture, preset.weights_gib, preset.max_model_len), []).append(name)
    rows = ["| `MODEL_NAME` | Architecture (config.json) | bf16 weights | `MAX_MODEL_LEN` | KV cache per "
            "full-length sequence |", "|---|---|---|---|---|"]
    for (arch, weights, max_model_len), names in groups.items():
        rows.append(f"| {', '.join(f'`{n}`' for n in names)} | {arch.name}: {arch.layers} layers "
                    f"({arch.sliding_layers} with a {arch.sliding_window}-token window), {arch.kv_heads} KV heads "
                    f"x {arch.head_dim}, {arch.max_positions or 'unknown'} positions | {weights} GiB | "
                    f"{max_model_len} | {arch.kv_gib_per_sequence(max_model_len):.2f} GiB |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(preset_table())
