"""The card plan, before the engine starts: GPU_MEMORY_UTILIZATION from free memory for every model, and for
GaMS presets bf16 where the card holds MIN_SEQUENCES sequences of MAX_MODEL_LEN (beside LoRA adapters' slots),
else FP8 weights, then an FP8 KV cache, then a shorter context. Explicit settings win; a model the card cannot
serve is refused with what would. README.md's card table is this plan for each RunPod card class (card_table.py)."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from gams_worker.config import WorkerConfig, variable_of
from gams_worker.errors import EngineStartError
from gams_worker.memory import GIB, ModelMemory, free_utilization
from gams_worker.presets import Preset, choose_tensor_parallel, preset_for
from gams_worker.startup.host import HostFacts
from gams_worker.versions import major_minor

MIN_SEQUENCES = 4  # full-length sequences a plan must hold: fewer serves one user at a time
MIN_CONTEXT = 2048  # no shorter context is offered: a chat with a system prompt needs room
CONTEXT_STEP = 1024
# (weights, KV cache) in the order tried; bf16 weights with an FP8 KV cache only where the KV cache is given.
STEPS = ((None, "auto"), ("fp8", "auto"), (None, "fp8"), ("fp8", "fp8"))
CARD_SETTINGS = ("quantization", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size")


@dataclasses.dataclass(frozen=True)
class Card:
    """The GPUs found: the smallest one's memory, and how many there are."""

    name: str
    capability: Tuple[int, int]
    total_bytes: int
    free_bytes: int
    count: int = 1


@dataclasses.dataclass(frozen=True)
class CardPlan:
    quantization: Optional[str]  # "fp8" or None (16-bit weights)
    kv_cache_dtype: str  # "auto" (as the weights' dtype) or an FP8 kind
    max_model_len: int
    gpu_memory_utilization: float
    tensor_parallel_size: int
    sequences: int  # max_model_len-token sequences whose KV cache fits
    why: str

    @property
    def summary(self) -> str:
        weights = "FP8 weights" if self.quantization == "fp8" else "bf16 weights"
        cache = "FP8 KV cache" if self.kv_cache_dtype.startswith("fp8") else "bf16 KV cache"
        return f"{weights}, {cache}, {self.max_model_len} tokens" + (
            "" if self.tensor_parallel_size == 1 else f", TP {self.tensor_parallel_size}")

    def line(self, card: Card) -> str:
        return (f"plan: {self.summary}, GPU_MEMORY_UTILIZATION {self.gpu_memory_utilization:g}: {self.sequences} "
                f"sequences of {self.max_model_len} tokens fit on {card.count} x {card.name} "
                f"({card.free_bytes / GIB:.1f} of {card.total_bytes / GIB:.1f} GiB free); {self.why}")


def card_of(facts: HostFacts) -> Optional[Card]:
    """The card in ``facts``, or None where NVML did not tell every GPU's memory and capability."""
    gpus = facts.gpus
    capability = major_minor(gpus[0].compute_capability) if gpus else None
    if not capability or any(g.total_bytes is None or g.free_bytes is None for g in gpus):
        return None
    if facts.cuda_arches and capability[0] * 10 + capability[1] < min(facts.cuda_arches):
        return None  # a card the image does not run: the doctor refuses it by name
    return Card(gpus[0].name, capability, min(g.total_bytes for g in gpus), min(g.free_bytes for g in gpus),
                len(gpus))


def _given(config: WorkerConfig, name: str) -> bool:
    return variable_of(name) in config.explicit


def _given_kv(config: WorkerConfig) -> Optional[str]:
    value = (config.engine_args or {}).get("kv_cache_dtype")
    return None if value is None else str(value)


def _steps(config: WorkerConfig) -> List[Tuple[Optional[str], str]]:
    kv = _given_kv(config)
    kind = None if kv is None else ("fp8" if kv.startswith("fp8") else "auto")
    return [(weights, kv if kind else cache) for weights, cache in STEPS
            if (weights == config.quantization or not _given(config, "quantization"))
            and (cache == kind if kind else (weights, cache) != (None, "fp8"))]


def _memory(preset: Preset, card: Card, step: Tuple[Optional[str], str], utilization: float,
            config: WorkerConfig) -> Tuple[int, ModelMemory]:
    """(tensor parallel size, memory per GPU) of ``step``: the fewest GPUs that hold its weights."""
    quantization, kv_cache_dtype = step
    bf16_bytes = int(preset.weights_gib * GIB)
    weights_gib = preset.architecture.memory(bf16_bytes, quantization=quantization).weight_bytes / GIB
    tp = (config.tensor_parallel_size if _given(config, "tensor_parallel_size") else
          choose_tensor_parallel(weights_gib, card.count, card.total_bytes / GIB, utilization))
    return tp, preset.architecture.memory(bf16_bytes, tp, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                                          lora_ranks=config.lora_ranks)


def plan_card(config: WorkerConfig, preset: Preset, card: Card) -> Optional[CardPlan]:
    """The first step that holds MIN_SEQUENCES sequences, else the last one with a shorter context
    (or, with MAX_MODEL_LEN given, at least one sequence); None where nothing fits."""
    utilization = (config.gpu_memory_utilization if _given(config, "gpu_memory_utilization")
                   else min(config.gpu_memory_utilization, free_utilization(card.total_bytes, card.free_bytes)))
    length, tried = config.max_model_len, []
    for step in _steps(config):
        tp, memory = _memory(preset, card, step, utilization, config)
        sequences = memory.sequences_that_fit(card.total_bytes, utilization, length)
        if sequences >= MIN_SEQUENCES:
            return CardPlan(*step, length, utilization, tp, sequences, _why(tried))
        tried.append(f"{CardPlan(*step, length, utilization, tp, sequences, '').summary}: {sequences}")
    if _given(config, "max_model_len"):
        return CardPlan(*step, length, utilization, tp, sequences, _why(tried, "MAX_MODEL_LEN is set")) \
            if sequences >= 1 else None
    shorter = min(memory.longest_sequence(memory.kv_budget(card.total_bytes, utilization) // MIN_SEQUENCES),
                  length) // CONTEXT_STEP * CONTEXT_STEP
    if shorter < MIN_CONTEXT:
        return None
    return CardPlan(*step, shorter, utilization, tp, memory.sequences_that_fit(card.total_bytes, utilization, shorter),
                    _why(tried, "a shorter context"))


def _why(tried: List[str], chosen: str = "") -> str:
    if not tried:
        return f"the first choice holds at least {MIN_SEQUENCES}" + (f" ({chosen})" if chosen else "")
    return f"fewer than {MIN_SEQUENCES} sequences with " + "; ".join(tried) + (f"; so {chosen}" if chosen else "")


def refusal(config: WorkerConfig, preset: Preset, card: Card) -> str:
    """One line: why the card cannot serve the model as set, and what would."""
    given = [variable_of(name) for name in CARD_SETTINGS if _given(config, name)] + (
        ["ENGINE_ARGS kv_cache_dtype"] if _given_kv(config) else [])
    shortest = config.max_model_len if _given(config, "max_model_len") else MIN_CONTEXT
    head = (f"{config.model_label} does not fit {card.count} x {card.name} ({card.free_bytes / GIB:.1f} GiB free): "
            f"no {shortest}-token sequence fits beside the weights")
    if given:
        free = dataclasses.replace(config, explicit=config.explicit - set(given), engine_args=None,
                                   max_model_len=preset.max_model_len, gpu_memory_utilization=0.90)
        plan = plan_card(free, preset, card)
        if plan:
            return f"{head} as set: unset {', '.join(given)} and the worker serves {plan.summary}"
    needed = minimum_free_gib(preset)
    return (f"{head}: it needs about {needed:.0f} GiB free per GPU (FP8 weights and KV cache) or "
            f"TENSOR_PARALLEL_SIZE={max(2, card.count * 2)} on as many GPUs")


def minimum_free_gib(preset: Preset) -> float:
    """Free memory per GPU that serves MIN_SEQUENCES sequences of MIN_CONTEXT tokens with FP8 weights and KV."""
    memory = preset.architecture.memory(int(preset.weights_gib * GIB), quantization="fp8", kv_cache_dtype="fp8")
    return (memory.weight_bytes + memory.overhead_bytes + MIN_SEQUENCES * memory.kv_bytes(MIN_CONTEXT)) / 0.9 / GIB


def apply_card_plan(config: WorkerConfig, facts: HostFacts) -> Tuple[WorkerConfig, str]:
    """``config`` planned for the card in ``facts``, and the plan's log line ("" where no card is known).
    Raises EngineStartError where a GaMS preset does not fit as set."""
    card = card_of(facts)
    if card is None:
        return config, ""
    preset = preset_for(config.model_preset or config.model_name)
    if preset is None or preset.architecture is None:
        if _given(config, "gpu_memory_utilization"):
            return config, ""
        utilization = min(config.gpu_memory_utilization, free_utilization(card.total_bytes, card.free_bytes))
        return dataclasses.replace(config, gpu_memory_utilization=utilization), (
            f"plan: GPU_MEMORY_UTILIZATION {utilization:g} ({card.free_bytes / GIB:.1f} of "
            f"{card.total_bytes / GIB:.1f} GiB free on {card.name})")
    plan = plan_card(config, preset, card)
    if plan is None:
        line = refusal(config, preset, card)
        raise EngineStartError(line, line)
    return dataclasses.replace(config, **_planned(plan)), plan.line(card)


def _planned(plan: CardPlan) -> Dict[str, object]:
    return {"quantization": plan.quantization, "kv_cache_dtype": plan.kv_cache_dtype,
            "max_model_len": plan.max_model_len, "gpu_memory_utilization": plan.gpu_memory_utilization,
            "tensor_parallel_size": plan.tensor_parallel_size}
