"""What the engine starts with, decided before it starts: the preset under the environment, the
doctor's verdicts, the model, max_num_seqs and the compile cache.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

from gams_worker.config import WorkerConfig
from gams_worker.presets import choose_tensor_parallel, full_length_sequences, preset_for

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


def kv_summary(config: WorkerConfig, gpu_count: int, gpu_memory_gib: Optional[float]) -> Optional[str]:
    """A start-up line: the KV cache of one MAX_MODEL_LEN sequence and how many fit, for GaMS presets."""
    preset = preset_for(config.model_preset or config.model_name)
    if preset is None or not gpu_memory_gib:
        return None
    tp, sequences = full_length_sequences(preset, gpu_memory_gib, gpu_count, config.max_model_len)
    return (f"KV cache: {preset.architecture.kv_gib_per_sequence(config.max_model_len):.2f} GiB per "
            f"{config.max_model_len}-token sequence ({preset.architecture.name}); about {sequences} full-length "
            f"sequences fit on {tp} x {gpu_memory_gib:.1f} GiB")
