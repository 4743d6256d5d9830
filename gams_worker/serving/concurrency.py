"""The job concurrency (jobs RunPod sends at once): the jobs the started engine's KV cache holds, since
more would only queue inside vLLM while other workers idle. MAX_CONCURRENCY wins."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from gams_worker.config import WorkerConfig

log = logging.getLogger(__name__)

# Jobs taken at once when neither MAX_CONCURRENCY nor the engine's KV cache size says.
DEFAULT_CONCURRENCY = 32


@dataclasses.dataclass(frozen=True)
class KvCapacity:
    kv_cache_tokens: int  # tokens the engine's KV cache holds
    max_num_seqs: int  # sequences vLLM's scheduler batches at once


def kv_capacity(engine: Any) -> Optional[KvCapacity]:
    """Read the KV cache size from a started vLLM engine (None if the engine did not say)."""
    vllm_config = engine.vllm_config
    cache = vllm_config.cache_config
    # Counted per KV group for hybrid (sliding-window) models: blocks x block size can be wrong there.
    tokens = cache.kv_cache_size_tokens
    if not tokens and cache.num_gpu_blocks:
        tokens = cache.num_gpu_blocks * cache.block_size
    if not tokens:
        return None
    return KvCapacity(kv_cache_tokens=int(tokens), max_num_seqs=int(vllm_config.scheduler_config.max_num_seqs))


def derive_concurrency(capacity: KvCapacity, expected_tokens_per_job: int) -> int:
    by_cache = capacity.kv_cache_tokens // max(expected_tokens_per_job, 1)
    return max(1, min(by_cache, capacity.max_num_seqs))


def concurrency_bound(capacity: KvCapacity, expected_tokens_per_job: int) -> str:
    """Which bound set ``derive_concurrency``, in words."""
    by_cache = capacity.kv_cache_tokens // max(expected_tokens_per_job, 1)
    if by_cache > capacity.max_num_seqs:
        return f"max_num_seqs set it (the KV cache holds {by_cache} such jobs)"
    return "the KV cache set it" if by_cache >= 1 else "at least 1 (the KV cache holds less than one such job)"


def job_concurrency(config: WorkerConfig, engine: Any) -> int:
    """Jobs this worker takes at once: MAX_CONCURRENCY, else sized from the engine's KV cache."""
    if config.max_concurrency is not None:
        log.info("concurrency: %d jobs (MAX_CONCURRENCY)", config.max_concurrency)
        return config.max_concurrency
    capacity = kv_capacity(engine)
    if capacity is None:
        log.info("concurrency: %d jobs (default; the engine reported no KV cache size)", DEFAULT_CONCURRENCY)
        return DEFAULT_CONCURRENCY
    concurrency = derive_concurrency(capacity, config.expected_tokens_per_job)
    log.info("concurrency: %d jobs = KV cache %d tokens / EXPECTED_TOKENS_PER_JOB %d, at most max_num_seqs %d: %s",
             concurrency, capacity.kv_cache_tokens, config.expected_tokens_per_job, capacity.max_num_seqs,
             concurrency_bound(capacity, config.expected_tokens_per_job))
    return concurrency
