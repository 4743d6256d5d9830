"""max_num_seqs sized before the engine starts: the jobs of EXPECTED_TOKENS_PER_JOB tokens whose KV
cache fits beside the weights (gams_worker/memory.py). MAX_NUM_SEQS wins; the log line says why."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Tuple

from gams_worker.config import WorkerConfig
from gams_worker.memory import GIB, ModelMemory
from gams_worker.startup.engine import VLLM_MAX_CAPTURE_SIZE
from gams_worker.startup.host import HostFacts

log = logging.getLogger(__name__)

# The most sequences sized for: vLLM's largest CUDA graph by default.
MAX_NUM_SEQS_CAP = VLLM_MAX_CAPTURE_SIZE
# Sized values are rounded down to a multiple of this, so that cards of one kind share one compile-cache
# entry (max_num_seqs is part of vLLM's hash).
MAX_NUM_SEQS_STEP = 16


def size_max_num_seqs(memory: ModelMemory, gpu_total_bytes: int, utilization: float,
                      expected_tokens_per_job: int) -> Tuple[int, str]:
    """(max_num_seqs, why) for one GPU of ``gpu_total_bytes`` (``memory`` is per GPU)."""
    kv_budget = memory.kv_budget(gpu_total_bytes, utilization)
    per_job = memory.kv_bytes(expected_tokens_per_job)
    fits = MAX_NUM_SEQS_CAP  # a model without a KV cache
    if per_job:
        fits = memory.sequences_that_fit(gpu_total_bytes, utilization, expected_tokens_per_job)
    why = (f"KV budget {kv_budget / GIB:.1f} GiB ({gpu_total_bytes / GIB:.1f} GiB x {utilization:g} - "
           f"{memory.weight_bytes / GIB:.1f} GiB weights - {memory.overhead_bytes / GIB:.1f} GiB engine"
           + (f" - {memory.adapter_bytes / GIB:.2f} GiB LoRA slots" if memory.adapter_bytes else "") + ") / "
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
    """``config`` with max_num_seqs sized for this GPU, logged with why (or what it would be under MAX_NUM_SEQS)."""
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
