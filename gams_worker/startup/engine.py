"""The one vLLM engine of the worker process: arguments, start-up, and its graph mode. Graph modes are the
rungs of the fallback ladder: ``full`` is vLLM's default (FULL decode graphs plus PIECEWISE graphs for mixed
batches), ``piecewise`` keeps only PIECEWISE graphs, ``eager`` captures none."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import time
from typing import Any, Dict, List, Tuple

from gams_worker.config import WorkerConfig
from gams_worker.errors import ConfigError
from gams_worker.startup.host import platform_name

log = logging.getLogger(__name__)

GRAPH_MODES = ("full", "piecewise", "eager")
# Test-only fault injection (tests/harness/fault_injection.py, importable where the tests run),
# named here so that the parent process need not import vLLM's worker classes.
FAILING_WORKER_CLS = "tests.harness.fault_injection.FailingStartWorker"
# compilation_config fields the worker sets: ENGINE_ARGS' compilation_config may set any other.
WORKER_COMPILATION_FIELDS = {"cudagraph_mode": "the graph mode (ENFORCE_EAGER, GRAPH_FALLBACK)"}
# The largest CUDA graph vLLM captures by default (min(2 x max_num_seqs, this)).
VLLM_MAX_CAPTURE_SIZE = 512


# The engine arguments the worker sets itself, and the setting of each: ENGINE_ARGS may not set them.
WORKER_ARGUMENTS = {
    "model": "MODEL_NAME", "tokenizer": "TOKENIZER_NAME", "revision": "MODEL_REVISION",
    "served_model_name": "SERVED_MODEL_NAME", "trust_remote_code": "TRUST_REMOTE_CODE", "dtype": "DTYPE",
    "max_model_len": "MAX_MODEL_LEN", "gpu_memory_utilization": "GPU_MEMORY_UTILIZATION",
    "tensor_parallel_size": "TENSOR_PARALLEL_SIZE", "enable_prefix_caching": "ENABLE_PREFIX_CACHING",
    "quantization": "QUANTIZATION", "enforce_eager": "ENFORCE_EAGER", "disable_log_stats": "LOG_ENGINE_STATS",
    "max_num_seqs": "MAX_NUM_SEQS", "max_cudagraph_capture_size": "MAX_CUDAGRAPH_CAPTURE_SIZE",
    "worker_cls": "GAMS_TEST_INJECT_START_FAILURE",
    "enable_lora": "LORA_MODULES", "max_cpu_loras": "LORA_MODULES", "max_loras": "MAX_LORAS",
    "max_lora_rank": "MAX_LORA_RANK",
}


def engine_kwargs(config: WorkerConfig, mode: str, model_path: str) -> Dict[str, Any]:
    """AsyncEngineArgs keyword arguments for ``config`` in graph ``mode``: ENGINE_ARGS and the worker's."""
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
    if config.kv_cache_dtype != "auto":  # the card plan's (ENGINE_ARGS' own, where given)
        kwargs["kv_cache_dtype"] = config.kv_cache_dtype
    if config.max_num_seqs is not None:
        kwargs["max_num_seqs"] = config.max_num_seqs
    if mode != "eager":
        kwargs.update(graph_arguments(config, mode))
    kwargs.update(lora_kwargs(config))
    if config.inject_start_failure:  # test-only: the first start fails inside the engine process
        kwargs["worker_cls"] = FAILING_WORKER_CLS  # which reads the variable: no part of vLLM's compile hash
    return {**(config.engine_args or {}), **kwargs}


def capture_sizes(largest: int) -> List[int]:
    """The batch sizes captured as CUDA graphs, up to ``largest``: 1, 2, 4, then each at most 1.5 x the one
    before (8, 12, 16, 24, 32, 48, ...). A batch runs in the next captured size up, so at most a third of its
    rows are padding; capturing 16 sizes where vLLM's default captures 51 takes a third of the time."""
    sizes = [size for size in (1, 2, 4) if size < largest]
    power = 8
    while power < largest:
        sizes += [size for size in (power, power * 3 // 2) if size < largest]
        power *= 2
    return sizes + [largest]


def graph_arguments(config: WorkerConfig, mode: str) -> Dict[str, Any]:
    """max_cudagraph_capture_size or the capture sizes, and compilation_config: ENGINE_ARGS' own, with the
    rung's graph mode and, unless it names them, the worker's capture sizes for the sized max_num_seqs."""
    arguments: Dict[str, Any] = {}
    compilation = dict((config.engine_args or {}).get("compilation_config") or {})
    if mode == "piecewise":
        compilation["cudagraph_mode"] = "PIECEWISE"
    if config.max_cudagraph_capture_size is not None:
        arguments["max_cudagraph_capture_size"] = config.max_cudagraph_capture_size
    elif config.max_num_seqs is not None and not {"cudagraph_capture_sizes", "max_cudagraph_capture_size"} & set(
            compilation):
        compilation["cudagraph_capture_sizes"] = capture_sizes(min(2 * config.max_num_seqs, VLLM_MAX_CAPTURE_SIZE))
    if mode == "piecewise" and platform_name() == "cuda":  # the FULL rung's compile cache (piecewise_rung.py)
        from gams_worker.startup.piecewise_rung import PiecewiseRungConfig

        compilation = PiecewiseRungConfig(**compilation)
    if compilation:
        arguments["compilation_config"] = compilation
    return arguments


def lora_kwargs(config: WorkerConfig) -> Dict[str, Any]:
    """vLLM's LoRA arguments where LORA_MODULES names adapters: each of them kept in CPU memory, MAX_LORAS of
    them on the GPU at once. On CPU one slot more than the adapters, left empty: vLLM's CPU LoRA ops apply the
    last slot to base-model requests (MAINTAINERS.md, "LoRA adapters")."""
    if not config.lora_modules:
        return {}
    slots = len(config.lora_modules) + 1 if platform_name() == "cpu" else config.lora_slots
    return dict(enable_lora=True, max_loras=slots, max_lora_rank=config.max_lora_rank,
                max_cpu_loras=max(slots, len(config.lora_modules)))


def with_checked_engine_args(config: WorkerConfig) -> WorkerConfig:
    """``config`` with ENGINE_ARGS' values as vLLM's own types; a ConfigError names the first argument
    that AsyncEngineArgs lacks, the worker sets itself, or whose value the argument's type refuses. Limits
    no type states (a count below 1) vLLM checks as the engine starts."""
    import pydantic

    AsyncEngineArgs, _ = import_engine_classes()
    types = {field.name: field.type for field in dataclasses.fields(AsyncEngineArgs)}
    checked = {}
    for name, value in (config.engine_args or {}).items():
        refuse = functools.partial(ConfigError, "ENGINE_ARGS", json.dumps({name: value}))
        if name in WORKER_ARGUMENTS:
            raise refuse(f"only arguments the worker does not set: {name} is set by {WORKER_ARGUMENTS[name]}")
        taken = set(value) & set(WORKER_COMPILATION_FIELDS) if name == "compilation_config" and isinstance(
            value, dict) else set()
        if taken:
            field = sorted(taken)[0]
            raise refuse(f"only fields the worker does not set: compilation_config.{field} is set by "
                         f"{WORKER_COMPILATION_FIELDS[field]}")
        if name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            raise refuse("names of vLLM's AsyncEngineArgs" + (f" (did you mean {close[0]}?)" if close else ""))
        try:
            checked[name] = pydantic.TypeAdapter(types[name]).validate_python(value)
            if name == "compilation_config":  # kept as given: the worker adds its fields per graph mode
                checked[name] = value
        except pydantic.PydanticSchemaGenerationError:  # a type pydantic cannot read (torch.dtype): vLLM's to check
            checked[name] = value
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            raise refuse(".".join(map(str, (name, *error["loc"]))) + ": " + error["msg"]) from None
    return dataclasses.replace(config, engine_args=checked or None)


def import_engine_classes() -> Tuple[Any, Any]:
    """vLLM's AsyncEngineArgs and AsyncLLM: importing them (torch, Inductor, transformers) is the
    longest step before the engine can start, so start-up does it as a step of its own."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncEngineArgs, AsyncLLM


def start_engine(config: WorkerConfig, mode: str, model_path: str) -> Any:
    """vLLM's async engine; raises whatever vLLM raises when start-up fails."""
    AsyncEngineArgs, AsyncLLM = import_engine_classes()
    kwargs = engine_kwargs(config, mode, model_path)
    passed = config.engine_args or {}
    log.info("starting vLLM engine in %s mode with the worker's arguments %s and ENGINE_ARGS %s", mode,
             {name: value for name, value in kwargs.items() if name not in passed}, passed or "none")
    started = time.monotonic()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    log.info("vLLM engine started in %s mode in %.1f s", mode, time.monotonic() - started)
    return engine
