"""Settings presets for the GaMS family, applied under the environment.

A preset fills only settings the environment left unset; the log says where every
value came from (env, preset or default). Tensor parallelism is chosen from the
GPUs present and the weight size: the fewest GPUs whose memory holds the weights
plus room for the KV cache.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Dict, Optional, Tuple

if TYPE_CHECKING:  # config.py imports PRESETS, to check MODEL_PRESET as it reads it
    from gams_worker.config import WorkerConfig

# Room beyond the weights on each GPU: activations, CUDA graphs and at least a few
# sequences of KV cache. Below this vLLM starts but serves almost nothing.
HEADROOM_GIB = 6.0


@dataclasses.dataclass(frozen=True)
class Preset:
    weights_gib: float  # bf16 weights, as vLLM reports "Model loading took"
    max_model_len: int
    gpu_memory_utilization: float = 0.90
    dtype: str = "bfloat16"


PRESETS: Dict[str, Preset] = {
    "cjvt/gams-2b-instruct": Preset(weights_gib=4.9, max_model_len=8192),
    "cjvt/gams-9b-instruct": Preset(weights_gib=17.2, max_model_len=4096),
    "cjvt/gams-9b-instruct-nemotron": Preset(weights_gib=17.2, max_model_len=4096),
    "cjvt/gams-27b-instruct": Preset(weights_gib=50.7, max_model_len=4096),
    "cjvt/gams3-12b-instruct": Preset(weights_gib=22.7, max_model_len=8192),
}


def preset_for(model_name: str) -> Optional[Preset]:
    """The preset of a GaMS repo id (case-insensitive), or None for other models."""
    return PRESETS.get(model_name.strip().rstrip("/").lower())


def choose_tensor_parallel(weights_gib: float, gpu_count: int, gpu_memory_gib: float, utilization: float) -> int:
    """Fewest GPUs (a power of two, at most ``gpu_count``) that hold the weights plus headroom."""
    size = 1
    while size * 2 <= max(gpu_count, 1):
        if weights_gib / size + HEADROOM_GIB <= gpu_memory_gib * utilization:
            break
        size *= 2
    return size


# The environment variable behind each setting a preset may fill.
PRESET_VARIABLES = {"max_model_len": "MAX_MODEL_LEN", "dtype": "DTYPE",
                    "gpu_memory_utilization": "GPU_MEMORY_UTILIZATION", "tensor_parallel_size": "TENSOR_PARALLEL_SIZE"}


def apply_preset(config: WorkerConfig, gpu_count: int, gpu_memory_gib: Optional[float]
                 ) -> Tuple[WorkerConfig, Dict[str, str]]:
    """Fill settings the environment left unset; return the new config and each value's source."""
    preset = preset_for(config.model_preset or config.model_name)
    from_env = {name for name, variable in PRESET_VARIABLES.items() if variable in config.explicit}
    sources = {name: ("env" if name in from_env else "default") for name in PRESET_VARIABLES}
    if preset is None:
        return config, sources
    changes = {}
    for name in ("max_model_len", "dtype", "gpu_memory_utilization"):
        if name not in from_env:
            changes[name] = getattr(preset, name)
            sources[name] = "preset"
    if "tensor_parallel_size" not in from_env and gpu_memory_gib:
        utilization = changes.get("gpu_memory_utilization", config.gpu_memory_utilization)
        changes["tensor_parallel_size"] = choose_tensor_parallel(
            preset.weights_gib, gpu_count, gpu_memory_gib, utilization)
        sources["tensor_parallel_size"] = "preset"
    return dataclasses.replace(config, **changes), sources
