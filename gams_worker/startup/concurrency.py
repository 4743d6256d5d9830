"""How many sequences the engine batches and how many jobs this worker takes at once.

Before the engine starts, ``max_num_seqs`` is sized with the memory model (gams_worker/memory.py):
the jobs of EXPECTED_TOKENS_PER_JOB tokens whose KV cache fits beside the weights. vLLM's own
default, 128 on every GPU, held an H200 to 0.76 x what it serves at 256 streams (issue 23), while
an L40S holds fewer. After it starts, the job concurrency (what RunPod sends at once) is the jobs
its KV cache holds: more only queue inside vLLM while other workers idle. MAX_NUM_SEQS and
MAX_CONCURRENCY win; both log lines say which bound set the number.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Tuple

from gams_worker.config import WorkerConfig
from gams_worker.memory import GIB, ModelMemory
from gams_worker.startup.host import HostFacts

log = logging.getLogger(__name__)

# Jobs taken at once when neither MAX_CONCURRENCY nor the engine's KV cache size says.
DEFAULT_CONCURRENCY = 32

# The most sequences sized for: vLLM's largest CUDA graph by default (max_cudagraph_capture_size 512).
MAX_NUM_SEQS_CAP = 512
# max_num_seqs is part of vLLM's compile-cache hash (SchedulerConfig.compute_hash): sized values are
# rounded down to a multiple of this, so that cards of one kind whose memory differs by a little share
# one compiled entry.
MAX_NUM_SEQS_STEP = 16


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


def size_max_num_seqs(memory: ModelMemory, gpu_total_bytes: int, utilization: float,
                      expected_tokens_per_job: int) -> Tuple[int, str]:
    """(max_num_seqs, why) for one GPU of ``gpu_total_bytes`` (``memory`` is per GPU)."""
    kv_budget = memory.kv_budget(gpu_total_bytes, utilization)
    per_job = memory.kv_bytes(expected_tokens_per_job)
    fits = MAX_NUM_SEQS_CAP  # a model without a KV cache
    if per_job:
        fits = memory.sequences_that_fit(gpu_total_bytes, utilization, expected_tokens_per_job)
    why = (f"KV budget {kv_budget / GIB:.1f} GiB ({gpu_total_bytes / GIB:.1f} GiB x {utilization:g} - "
           f"{memory.weight_bytes / GIB:.1f} GiB weights - {memory.overhead_bytes / GIB:.1f} GiB engine) / "
           f"{per_job / GIB:.3f} GiB KV per {expected_tokens_per_job}-token job (EXPECTED_TOKENS_PER_JOB)"
           f" = {fits} jobs")
    if fits >= MAX_NUM_SEQS_CAP:
        return MAX_NUM_SEQS_CAP, why + f", at most {MAX_NUM_SEQS_CAP} (vLLM's largest CUDA graph)"
    if fits < MAX_NUM_SEQS_STEP:
        return max(1, fits), why + (", at least 1" if fits < 1 else "")
    value = fits // MAX_NUM_SEQS_STEP * MAX_NUM_SEQS_STEP
    return value, why + (f", rounded down to a multiple of {MAX_NUM_SEQS_STEP} (one compile-cache entry per "
                         f"kind of card)" if value != fits else "")


def with_max_num_seqs(config: WorkerConfig, facts: HostFacts, memory: Optional[ModelMemory]) -> WorkerConfig:
    """``config`` with max_num_seqs sized for this GPU (``size_max_num_seqs``), logged with why;
    MAX_NUM_SEQS wins (the line then says what the sizing would have given)."""
    gpus = facts.gpus[: config.tensor_parallel_size]
    if not gpus or any(gpu.total_bytes is None for gpu in gpus):
        sized, why = None, "no GPU memory to size it from"
    elif memory is None:
        sized, why = None, "the model's memory is unknown: its config.json was not read"
    else:
        sized, why = size_max_num_seqs(memory, min(gpu.total_bytes for gpu in gpus), config.gpu_memory_utilization,
                                       config.expected_tokens_per_job)
    if config.max_num_seqs is not None:
        log.info("max_num_seqs: %d (MAX_NUM_SEQS; %s)", config.max_num_seqs,
                 f"sized, it would be {sized} = {why}" if sized else f"unsized: {why}")
        return config
    if sized is None:
        log.info("max_num_seqs: vLLM's default (%s)", why)
        return config
    log.info("max_num_seqs: %d = %s", sized, why)
    return dataclasses.replace(config, max_num_seqs=sized)


def job_concurrency(config: WorkerConfig, engine: Any) -> int:
    """Jobs this worker takes at once: MAX_CONCURRENCY, else sized from the engine's KV cache."""
    if config.max_concurrency is not None:
        log.info("concurrency: %d jobs (MAX_CONCURRENCY)", config.max_concurrency)
        return config.max_concurrency
    capacity = kv_capacity(engine)
    if capacity is None:
        log.info("concurrency: %d jobs (default; the engine reported no KV cache size)",
                 DEFAULT_CONCURRENCY)
        return DEFAULT_CONCURRENCY
    concurrency = derive_concurrency(capacity, config.expected_tokens_per_job)
    log.info("concurrency: %d jobs = KV cache %d tokens / EXPECTED_TOKENS_PER_JOB %d, at most max_num_seqs %d: %s",
             concurrency, capacity.kv_cache_tokens, config.expected_tokens_per_job, capacity.max_num_seqs,
             concurrency_bound(capacity, config.expected_tokens_per_job))
    return concurrency
