"""The one vLLM engine of the worker process: arguments, start-up, and its graph mode.

Graph modes are the rungs of the fallback ladder: ``full`` is vLLM's default
(FULL decode graphs plus PIECEWISE graphs for mixed batches), ``piecewise`` keeps
only PIECEWISE graphs, ``eager`` captures none.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Tuple

from gams_worker.config import WorkerConfig

log = logging.getLogger(__name__)

GRAPH_MODES = ("full", "piecewise", "eager")
# Test-only fault injection (tests/harness/fault_injection.py, importable where the tests run),
# named here so that the parent process need not import vLLM's worker classes.
FAILING_WORKER_CLS = "tests.harness.fault_injection.FailingStartWorker"
INJECTED_FAILURE_KEY = "gams_inject_start_failure"  # in vLLM's additional_config


def engine_kwargs(config: WorkerConfig, mode: str, model_path: str) -> Dict[str, Any]:
    """AsyncEngineArgs keyword arguments for ``config`` in graph ``mode``."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"unknown graph mode {mode!r}")
    kwargs: Dict[str, Any] = dict(
        model=model_path,
        tokenizer=config.tokenizer_name or model_path,
        revision=config.model_revision,
        served_model_name=config.model_label,
        trust_remote_code=config.trust_remote_code,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        enable_prefix_caching=config.enable_prefix_caching,
        quantization=config.quantization,
        enforce_eager=mode == "eager",
        disable_log_stats=not config.log_engine_stats,
    )
    if config.max_num_seqs is not None:
        kwargs["max_num_seqs"] = config.max_num_seqs
    if config.max_cudagraph_capture_size is not None and mode != "eager":
        kwargs["max_cudagraph_capture_size"] = config.max_cudagraph_capture_size
    if mode == "piecewise":
        kwargs["compilation_config"] = {"cudagraph_mode": "PIECEWISE"}
    if config.inject_start_failure:  # test-only: the first start fails inside the engine process
        kwargs["worker_cls"] = FAILING_WORKER_CLS
        kwargs["additional_config"] = {INJECTED_FAILURE_KEY: config.inject_start_failure}
    return kwargs


def import_engine_classes() -> Tuple[Any, Any]:
    """vLLM's AsyncEngineArgs and AsyncLLM: importing them (torch, Inductor, transformers) is the
    longest step before the engine can start, so start-up does it as a step of its own."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncEngineArgs, AsyncLLM


def start_engine(config: WorkerConfig, mode: str, model_path: str) -> Any:
    """Create vLLM's async engine; raises whatever vLLM raises when start-up fails."""
    AsyncEngineArgs, AsyncLLM = import_engine_classes()
    kwargs = engine_kwargs(config, mode, model_path)
    log.info("starting vLLM engine in %s mode: %s", mode, kwargs)
    started = time.monotonic()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    log.info("vLLM engine started in %s mode in %.1f s", mode, time.monotonic() - started)
    return engine
