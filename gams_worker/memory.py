"""The one memory model of a GPU serving the model, per GPU, used by the presets, the doctor and the
sizing of max_num_seqs: KV budget = GPU memory x GPU_MEMORY_UTILIZATION - weights / TP - engine overhead
- LoRA slots. A sliding layer keeps only its last ``sliding_window`` tokens, as vLLM's v1 engine does.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
from typing import Any, Dict, Optional, Tuple

log = logging.getLogger(__name__)

GIB = 1024**3
# CUDA context, activations and CUDA graphs, rounded up from measurements (MAINTAINERS.md, "GaMS presets").
ENGINE_OVERHEAD_BYTES = int(1.5 * GIB)  # on one GPU
TP_ENGINE_OVERHEAD_BYTES = 2 * GIB  # on each GPU: tensor parallelism adds NCCL's buffers
# LoRA takes its adapter slots' bytes from the KV cache twice over: the slots, and as much again in the
# CUDA graphs and activations vLLM adds for them (BENCHMARKS.md, "LoRA adapters").
LORA_COST_PER_SLOT_BYTE = 2
# Room beyond the weights for a GPU to be worth serving on: below it vLLM starts but serves almost nothing.
HEADROOM_BYTES = 6 * GIB
# vLLM's engine process makes its own CUDA context after the worker read the free memory: room kept for it.
ENGINE_CONTEXT_BYTES = int(0.75 * GIB)


def free_utilization(total_bytes: int, free_bytes: int) -> float:
    """The highest GPU_MEMORY_UTILIZATION vLLM starts with: it refuses total x utilization above free memory."""
    return max(math.floor((free_bytes - ENGINE_CONTEXT_BYTES) / total_bytes * 100) / 100, 0.0)


@dataclasses.dataclass(frozen=True)
class ModelMemory:
    """What the model needs in GPU memory, per GPU."""

    weight_bytes: int
    kv_bytes_per_layer_token: int  # keys and values of one token in one layer
    full_layers: int
    sliding_layers: int  # layers that keep only the last ``sliding_window`` tokens (Gemma 2: every other one)
    sliding_window: int
    source: str  # where the weight figure came from
    overhead_bytes: int = ENGINE_OVERHEAD_BYTES
    adapter_bytes: int = 0  # LoRA's cost: MAX_LORAS adapter slots at MAX_LORA_RANK, x LORA_COST_PER_SLOT_BYTE

    def kv_bytes(self, tokens: int) -> int:
        """KV cache of one ``tokens``-long sequence."""
        return self.kv_bytes_per_layer_token * (self.full_layers * tokens
                                                + self.sliding_layers * min(tokens, self.sliding_window))

    def kv_budget(self, gpu_total_bytes: float, utilization: float) -> int:
        """What is left for the KV cache on a GPU of ``gpu_total_bytes`` at ``utilization``."""
        return int(gpu_total_bytes * utilization) - self.weight_bytes - self.overhead_bytes - self.adapter_bytes

    def sequences_that_fit(self, gpu_total_bytes: float, utilization: float, tokens: int) -> int:
        """How many ``tokens``-long sequences the KV budget holds (0 when the weights leave no room)."""
        per_sequence = self.kv_bytes(tokens)
        return max(self.kv_budget(gpu_total_bytes, utilization), 0) // per_sequence if per_sequence else 0

    def longest_sequence(self, kv_budget_bytes: int) -> int:
        """The most tokens one sequence may have for its KV cache to fit ``kv_budget_bytes``."""
        per_token_all_layers = self.kv_bytes_per_layer_token * (self.full_layers + self.sliding_layers)
        within_window = kv_budget_bytes // per_token_all_layers
        if within_window <= self.sliding_window or self.full_layers == 0:
            return within_window
        # Past the window only the full layers grow.
        window_bytes = self.kv_bytes_per_layer_token * self.sliding_layers * self.sliding_window
        return (kv_budget_bytes - window_bytes) // (self.kv_bytes_per_layer_token * self.full_layers)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The config.json facts that size the KV cache."""

    name: str  # "Gemma 2 9B"
    layers: int
    sliding_layers: int  # layers that attend only to the last ``sliding_window`` tokens
    kv_heads: int
    head_dim: int
    sliding_window: int
    max_positions: Optional[int]  # max_position_embeddings; None where not known here
    source: str  # where these facts come from
    embedding_params: int = 0  # vocabulary x hidden size: the (tied) embedding FP8 leaves in 16 bits
    lora_params_per_rank: int = 0  # one adapter's parameters per unit of rank (lora_params_per_rank)

    def memory(self, weight_bytes: int, tensor_parallel_size: int = 1, element_bytes: int = 2,
               source: str = "", quantization: Optional[str] = None, kv_cache_dtype: str = "auto",
               lora_ranks: int = 0) -> ModelMemory:
        """The model's memory per GPU: weights and each layer's keys and values split over the GPUs.
        ``weight_bytes`` are the 16-bit weights; ``quantization`` and ``kv_cache_dtype`` "fp8" shrink them.
        ``lora_ranks``: MAX_LORAS x MAX_LORA_RANK, the adapter slots vLLM allocates (16-bit, as the model)."""
        if quantization == "fp8":  # vLLM's online FP8 halves the linear layers only
            embedding = self.embedding_params * element_bytes
            weight_bytes = (weight_bytes - embedding) // 2 + embedding
        per_layer_token = 2 * self.kv_heads * self.head_dim * (1 if kv_cache_dtype.startswith("fp8") else element_bytes)
        return ModelMemory(weight_bytes // tensor_parallel_size, per_layer_token // tensor_parallel_size,
                           self.layers - self.sliding_layers, self.sliding_layers, self.sliding_window,
                           source or self.source,
                           ENGINE_OVERHEAD_BYTES if tensor_parallel_size <= 1 else TP_ENGINE_OVERHEAD_BYTES,
                           LORA_COST_PER_SLOT_BYTE * self.lora_params_per_rank * lora_ranks * element_bytes
                           // tensor_parallel_size)

    def kv_gib_per_sequence(self, tokens: int) -> float:
        """KV cache of one ``tokens``-long sequence, keys and values, bf16, all GPUs together."""
        return self.memory(0).kv_bytes(tokens) / GIB


def lora_shapes(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> Dict[str, Tuple[int, int]]:
    """(in, out) features of each layer's linear modules a LoRA adapter of Gemma 2 (and 3) may target in vLLM."""
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    return {"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden), "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden)}


def lora_shapes_of(text: Dict[str, Any]) -> Dict[str, Tuple[int, int]]:
    """``lora_shapes`` of the model whose (text) config.json is ``text``."""
    hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    return lora_shapes(hidden, heads, int(text.get("num_key_value_heads") or heads),
                       int(text.get("head_dim") or hidden // heads), int(text.get("intermediate_size") or 0))


def lora_params_per_rank(layers: int, *shape: int) -> int:
    """One adapter's parameters per unit of rank when it targets every module of ``lora_shapes(*shape)``: vLLM
    allocates A (rank x in) and B (out x rank) of each for each of MAX_LORAS slots at MAX_LORA_RANK."""
    return layers * sum(in_features + out_features for in_features, out_features in lora_shapes(*shape).values())


def model_memory(model_dir: str, dtype: str, tensor_parallel_size: int, quantization: Optional[str] = None,
                 kv_cache_dtype: str = "auto", lora_ranks: int = 0) -> Optional[ModelMemory]:
    """The memory of the model in ``model_dir``; None (and a warning) where it cannot be read: never raises."""
    try:
        config_path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(config_path):
            return None
        with open(config_path, encoding="utf-8") as handle:
            model_config = json.load(handle)
        weight_files = sum(os.path.getsize(path) for path in glob.glob(os.path.join(model_dir, "*.safetensors")))
        return memory_from_config(model_config, dtype, tensor_parallel_size, weight_files or None, quantization,
                                  kv_cache_dtype, lora_ranks)
    except Exception as exc:
        log.warning("doctor: could not estimate the model's memory: %r", exc)
        return None


def memory_from_config(model_config: Dict[str, Any], dtype: str, tensor_parallel_size: int,
                       weight_files_bytes: Optional[int] = None, quantization: Optional[str] = None,
                       kv_cache_dtype: str = "auto", lora_ranks: int = 0) -> ModelMemory:
    """The memory per GPU of a model served in ``dtype``: weights from its files, else estimated."""
    text = model_config.get("text_config") or model_config
    hidden = int(text["hidden_size"])
    layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    stored_dtype = text.get("torch_dtype") or text.get("dtype")
    element_bytes = _dtype_bytes(dtype, stored_dtype)
    if weight_files_bytes:
        # Checkpoint files hold the weights in their stored dtype; rescale if served in another.
        weights = weight_files_bytes * element_bytes // _dtype_bytes("auto", stored_dtype)
        source = "from the weight files"
    else:
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
        mlp = 3 * hidden * int(text["intermediate_size"])
        embeddings = int(text["vocab_size"]) * hidden * (1 if text.get("tie_word_embeddings", True) else 2)
        weights, source = (layers * (attention + mlp) + embeddings) * element_bytes, "estimated from config.json"
    sliding_layers, sliding_window = _sliding_layers(text, layers)
    architecture = Architecture(text.get("model_type") or "config.json", layers, sliding_layers, kv_heads, head_dim,
                                sliding_window, text.get("max_position_embeddings"), "config.json",
                                int(text.get("vocab_size") or 0) * hidden,
                                lora_params_per_rank(layers, hidden, heads, kv_heads, head_dim,
                                                     int(text.get("intermediate_size") or 0)))
    return architecture.memory(weights, tensor_parallel_size, element_bytes, source, quantization, kv_cache_dtype,
                               lora_ranks)


def _sliding_layers(text: Dict[str, Any], layers: int) -> Tuple[int, int]:
    """(layers with a sliding window, its tokens); (0, 0) where config.json does not say: an overestimate."""
    window = text.get("sliding_window")
    if not window or text.get("use_sliding_window") is False:  # Qwen2 names a window it does not use
        return 0, 0
    layer_types = text.get("layer_types")
    if isinstance(layer_types, list):
        return sum(kind == "sliding_attention" for kind in layer_types), int(window)
    if text.get("model_type") == "gemma2" or "Gemma2ForCausalLM" in (text.get("architectures") or ()):
        return (layers + 1) // 2, int(window)  # layers 0, 2, 4, ... slide
    pattern = text.get("sliding_window_pattern")
    if pattern:  # Gemma 3: every pattern-th layer attends to everything
        return layers - layers // int(pattern), int(window)
    return 0, 0


def _dtype_bytes(requested: str, stored: Optional[str]) -> int:
    dtype = stored if requested == "auto" else requested
    return 4 if dtype in ("float32", "torch.float32") else 2
