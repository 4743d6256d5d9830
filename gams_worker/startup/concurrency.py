"""How many jobs this worker takes at once, sized from the KV cache the engine really got.

RunPod sends a worker up to its concurrency in jobs. More jobs than the KV cache
holds only queue inside vLLM (their time to first token grows while other workers
idle); fewer leave the GPU underused. So after the engine starts:

    concurrency = clamp(kv_cache_tokens // expected_tokens_per_job, 1, max_num_seqs)

unless MAX_CONCURRENCY is set.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class KvCapacity:
    kv_cache_tokens: int  # tokens the engine's KV cache holds
    max_num_seqs: int  # sequences vLLM's scheduler batches at once


def kv_capacity(engine: Any) -> Optional[KvCapacity]:
    """Read the KV cache size from a started vLLM engine (None if this vLLM does not say)."""
    vllm_config = getattr(engine, "vllm_config", None)
    if vllm_config is None:
        return None
    cache = vllm_config.cache_config
    # vLLM >= 0.30 counts tokens per KV group for hybrid (sliding-window) models.
    tokens = getattr(cache, "kv_cache_size_tokens", None)
    if not tokens and cache.num_gpu_blocks:
        tokens = cache.num_gpu_blocks * cache.block_size
    if not tokens:
        return None
    return KvCapacity(kv_cache_tokens=int(tokens), max_num_seqs=int(vllm_config.scheduler_config.max_num_seqs))


def derive_concurrency(capacity: KvCapacity, expected_tokens_per_job: int) -> int:
    by_cache = capacity.kv_cache_tokens // max(expected_tokens_per_job, 1)
    return max(1, min(by_cache, capacity.max_num_seqs))
