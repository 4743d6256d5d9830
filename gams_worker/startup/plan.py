"""What the engine starts with, decided before it starts (``plan_engine``): the preset under the environment,
the card plan, the doctor's verdicts and the ladder's first rung, the model and its LoRA adapters, max_num_seqs, the
compile cache, and the environment vLLM's engine process inherits.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, Optional, Tuple

from gams_worker.config import WorkerConfig, export_to_engine, variable_of
from gams_worker.errors import EngineStartError
from gams_worker.memory import model_memory
from gams_worker.presets import choose_tensor_parallel, preset_for
from gams_worker.startup.adapters import locate_adapters
from gams_worker.startup.card_plan import apply_card_plan
from gams_worker.startup.compile_cache import CompileCache, choose_compile_cache
from gams_worker.startup.doctor import DoctorReport, run_doctor
from gams_worker.startup.engine import with_checked_engine_args
from gams_worker.startup.host import host_facts
from gams_worker.startup.max_num_seqs import with_max_num_seqs
from gams_worker.startup.model import BAKED, ResolvedModel, resolve_model

log = logging.getLogger(__name__)

BAKED_MODEL_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PRESET_SETTINGS = ("max_model_len", "dtype", "gpu_memory_utilization", "tensor_parallel_size")  # what a preset fills
# vLLM's wait for its engine process has no "off": a year stands for ENGINE_START_TIMEOUT_S=0.
NO_DEADLINE_S = 365 * 24 * 3600
VLLM_BAD_WORDS_TOTAL_TOKENS = 1024  # vLLM's default


def engine_ready_timeout(config: WorkerConfig) -> Dict[str, str]:
    """ENGINE_START_TIMEOUT_S handed to vLLM too, so its own 600 s default never ends a start first.
    vLLM reads it when its engine classes are imported: export it before."""
    return {"VLLM_ENGINE_READY_TIMEOUT_S": str(config.engine_start_timeout_s or NO_DEADLINE_S)}


def bad_words_budget(config: WorkerConfig) -> Dict[str, str]:
    """vLLM's GPU model runner fails its engine on a request whose bad words tokenize to more than
    VLLM_MAX_BAD_WORDS_TOTAL_TOKENS: sized so that every input the worker's limits allow fits (vLLM
    tokenizes each word twice, with and without a leading space; a token covers at least one UTF-8 byte)."""
    limits = config.input_limits
    worst = limits.max_bad_words * 2 * (4 * limits.max_stop_length + 1)
    return {"VLLM_MAX_BAD_WORDS_TOTAL_TOKENS": str(max(worst, VLLM_BAD_WORDS_TOTAL_TOKENS))}


def apply_preset(config: WorkerConfig, gpu_count: int, gpu_memory_gib: Optional[float]
                 ) -> Tuple[WorkerConfig, Dict[str, str]]:
    """Fill settings the environment left unset; return the new config and each value's source."""
    preset = preset_for(config.model_preset or config.model_name)
    from_env = {name for name in PRESET_SETTINGS if variable_of(name) in config.explicit}
    sources = {name: ("env" if name in from_env else "default") for name in PRESET_SETTINGS}
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


def first_rung(config: WorkerConfig, report: DoctorReport) -> Tuple[str, str]:
    """The graph mode the engine starts in, and why."""
    if config.enforce_eager:
        return "eager", "ENFORCE_EAGER is set"
    if report.start_mode:
        return report.start_mode, report.start_reason
    return "full", "default"


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    """What the engine starts with, decided before it starts."""

    config: WorkerConfig  # with the preset applied
    mode: str  # the first graph mode of the fallback ladder
    reason: str
    model_path: str
    compile_cache: CompileCache
    card_plan: str = ""  # the card plan's line
    adapters: Tuple[Any, ...] = ()  # vLLM's LoRAModulePath of each LORA_MODULES adapter, its path a checked folder


def plan_engine(config: WorkerConfig, local_model: Optional[ResolvedModel],
                mark: Callable[[str], None] = lambda step: None) -> EnginePlan:
    """Preset, doctor, model and compile cache, in that order; sets the environment vLLM's
    engine process inherits. ``mark`` stamps each step on the start-up timeline."""
    config = with_checked_engine_args(config)  # ENGINE_ARGS: a bad one stops the start here
    facts = host_facts()
    gpu_memory_gib = facts.gpus[0].total_gib if facts.gpus else None
    config, sources = apply_preset(config, len(facts.gpus), gpu_memory_gib)
    log.info("settings: %s", ", ".join(f"{name}={getattr(config, name)} ({source})" for name, source in sources.items()))
    config, card_line = apply_card_plan(config, facts)  # a preset that cannot fit stops the start here
    if card_line:
        log.info(card_line)
    report = run_doctor(config, facts, local_model.path if local_model else None)
    if report.blocking:
        problems = "; ".join(report.blocking)
        raise EngineStartError(f"the doctor found problems no engine start gets past: {problems}", problems)
    mode, reason = first_rung(config, report)
    mark("doctor done")
    model = resolve_model(config)  # baked copy, then caches, then the hub
    if model.source == BAKED:
        # A baked copy is whole: nothing may reach for the hub (RunPod's worker-vllm sets the same).
        export_to_engine(BAKED_MODEL_OFFLINE)
        log.info("serving the baked copy: %s", " ".join(f"{k}={v}" for k, v in BAKED_MODEL_OFFLINE.items()))
    mark("model resolved")
    adapters = locate_adapters(config, model.path)  # an adapter that cannot be served stops the start here
    # The doctor read the model's memory where it was here already; a download is read now.
    memory = report.memory or model_memory(model.path, config.dtype, config.tensor_parallel_size,
                                           config.quantization, config.kv_cache_dtype,
                                           config.lora_ranks)
    config = with_max_num_seqs(config, facts, memory)
    compile_cache = choose_compile_cache(config)
    export_to_engine(compile_cache.engine_environment(), compile_cache.engine_defaults())
    mark("compile cache checked")
    return EnginePlan(config, mode, reason, model.path, compile_cache, card_line, adapters)
