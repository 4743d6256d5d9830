"""The CUDA doctor: verdicts on the host (host.py) and the model's memory before the engine starts,
each with its remedy; a verdict may choose the fallback ladder's first rung, and some block the start.
It never raises: what it cannot tell it reports as "unknown".
"""

from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional, Tuple

from gams_worker.config import WorkerConfig
from gams_worker.memory import GIB, ModelMemory, free_utilization, model_memory
from gams_worker.startup.host import NO_PLATFORM, UNKNOWN, GpuFacts, HostFacts
from gams_worker.versions import major_minor

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DoctorReport:
    facts: HostFacts
    lines: Tuple[str, ...]  # the report, one fact per line
    verdicts: Tuple[str, ...]  # problems found, each with its remedy
    start_mode: Optional[str] = None  # a rung the verdicts choose to start from, if any
    start_reason: str = ""
    blocking: Tuple[str, ...] = ()  # problems no start can get past: the worker stops with these
    memory: Optional[ModelMemory] = None  # what the model needs, if its files were here to read


def run_doctor(config: WorkerConfig, facts: HostFacts, model_dir: Optional[str]) -> DoctorReport:
    """Judge the host for the model in ``model_dir`` (None: not on this machine yet); log the
    report and return it. Never raises."""
    memory = model_memory(model_dir, config.dtype, config.tensor_parallel_size, config.quantization,
                          config.kv_cache_dtype, config.lora_ranks) if model_dir else None
    report = dataclasses.replace(diagnose(facts, memory, config), memory=memory)
    log.info("doctor report:\n  %s", "\n  ".join(report.lines))
    for verdict in report.verdicts:
        log.warning("doctor: %s", verdict)
    if not report.verdicts:
        log.info("doctor: no problems found")
    return report


def diagnose(facts: HostFacts, memory: Optional[ModelMemory], config: WorkerConfig) -> DoctorReport:
    """The report and verdicts for ``facts``; pure, so tests can feed it any host."""
    lines = _report_lines(facts, memory, config)
    if facts.platform == "cpu":
        lines.append("CPU backend: vLLM captures no CUDA graphs here; GPU checks skipped")
        return DoctorReport(facts, tuple(lines), ())
    if facts.platform == NO_PLATFORM:
        # vLLM would fail later with "Device string must not be empty", which names no cause.
        problem = ("no NVIDIA GPU is visible: vLLM found no GPU and no NVIDIA driver (NVML did not answer), "
                   "and this image runs only on NVIDIA GPUs: give the endpoint a GPU, or run the container with "
                   "the NVIDIA runtime (docker --gpus all, podman --device nvidia.com/gpu=all)")
        return DoctorReport(facts, tuple(lines), (problem,), blocking=(problem,))
    verdicts: List[str] = []
    start_mode, start_reason = None, ""
    driver_verdict = _driver_verdict(facts)
    if driver_verdict:
        verdicts.append(driver_verdict)
        if config.graph_fallback and not config.enforce_eager:
            start_mode = "piecewise"
            start_reason = ("driver older than the CUDA toolkit: FULL CUDA-graph capture would need "
                            "PTX the driver cannot JIT, so the doctor starts at piecewise")
            verdicts.append("starting at piecewise instead of full (" + start_reason + ")")
    if facts.platform == "cuda" and not facts.gpus:
        verdicts.append("no GPU visible through NVML: the engine will likely fail to start; check the "
                        "pod has a GPU and the NVIDIA container runtime")
    memory_verdict = _memory_verdict(facts, memory, config)
    if memory_verdict:
        verdicts.append(memory_verdict)
    blocking = _gpu_requirement_problems(facts, config)
    lines.extend(_architecture_lines(facts.gpus[0]) if facts.gpus else ())
    return DoctorReport(facts, tuple(lines), tuple(verdicts + blocking), start_mode, start_reason, tuple(blocking))


def _report_lines(facts: HostFacts, memory: Optional[ModelMemory], config: WorkerConfig) -> List[str]:
    lines = [f"platform: {facts.platform}"]
    for index, gpu in enumerate(facts.gpus):
        lines.append(f"GPU {index}: {gpu.name}, compute capability {gpu.compute_capability}, "
                     f"{_gib(gpu.free_bytes)} free of {_gib(gpu.total_bytes)} GiB")
    if facts.platform == "cuda" or facts.gpus:
        lines.append(f"driver {facts.driver_version}, supports CUDA up to {facts.driver_cuda}")
    lines.append(f"torch {facts.torch_version} built for CUDA {facts.torch_cuda}; vLLM {facts.vllm_version}")
    if memory is None:
        lines.append("model memory: unknown (the model's config.json is not on this machine)")
    else:
        lines.append(f"model needs ~{_gib(memory.weight_bytes)} GiB of weights per GPU ({memory.source}) "
                     f"+ ~{_gib(memory.kv_bytes(config.max_model_len))} GiB KV cache for "
                     f"MAX_MODEL_LEN={config.max_model_len}")
    return lines


def _architecture_lines(gpu: GpuFacts) -> List[str]:
    """What the image's kernels serve on this architecture (MAINTAINERS.md, "Cards")."""
    capability = major_minor(gpu.compute_capability) or (0, 0)
    lines = ["FP8 weights: " + ("FP8 tensor cores" if capability >= (8, 9) else
                                "weight-only (vLLM's Marlin kernel: FP8 in memory, 16-bit math)")]
    if capability[0] != 9:
        lines.append("an FP8 KV cache runs Triton attention (FlashAttention's FP8 KV cache is Hopper's FA3)")
    if capability[0] >= 10:
        lines.append("Blackwell: Gemma 2's soft-capped attention runs FlashAttention 2 (FA4's head-256 kernel "
                     "has no soft-capping; FlashInfer is off in the image)")
    return lines


def _unsupported(gpu: GpuFacts, arches: Tuple[int, ...]) -> Optional[str]:
    """A GPU older than every architecture the image's torch was built for, named."""
    capability = major_minor(gpu.compute_capability)
    if not capability or not arches or capability[0] * 10 + capability[1] >= min(arches):
        return None
    oldest = min(arches)
    return (f"{gpu.name} (compute capability {gpu.compute_capability}) is not supported by this image: its "
            f"torch and vLLM are built for compute capability {oldest // 10}.{oldest % 10} "
            f"and newer: deploy on Ampere or newer (RunPod: any class in README's card table)")


def _free_memory_problem(gpu: GpuFacts, config: WorkerConfig) -> Optional[str]:
    """vLLM refuses to start where total x GPU_MEMORY_UTILIZATION exceeds the free memory."""
    if gpu.total_bytes is None or gpu.free_bytes is None:
        return None
    fraction = free_utilization(gpu.total_bytes, gpu.free_bytes)
    if config.gpu_memory_utilization <= fraction:
        return None
    return (f"only {_gib(gpu.free_bytes)} GiB of {_gib(gpu.total_bytes)} GiB free (another process uses the "
            f"GPU?): lower GPU_MEMORY_UTILIZATION to {fraction:.2f} (or unset it: the worker plans for free "
            f"memory) or free the GPU")


def _gpu_requirement_problems(facts: HostFacts, config: WorkerConfig) -> List[str]:
    """Settings this host cannot honour (only judged where NVML listed the GPUs)."""
    if not facts.gpus:
        return []
    problems = []
    minimum, driver = major_minor(config.min_cuda_version), major_minor(facts.driver_cuda)
    if minimum and driver and driver < minimum:
        problems.append(f"driver supports CUDA {facts.driver_cuda}, RUNPOD_MIN_CUDA_VERSION is {config.min_cuda_version}: "
                        f"deploy on hosts with CUDA >= {config.min_cuda_version} (RunPod: allowedCudaVersions)")
    if config.tensor_parallel_size > len(facts.gpus):
        problems.append(f"TENSOR_PARALLEL_SIZE={config.tensor_parallel_size} but {len(facts.gpus)} GPU(s) visible: "
                        f"deploy with {config.tensor_parallel_size} GPUs per worker or lower TENSOR_PARALLEL_SIZE")
    for gpu in facts.gpus[: config.tensor_parallel_size]:
        problem = _unsupported(gpu, facts.cuda_arches) or _free_memory_problem(gpu, config)
        if problem:
            return problems + [problem]
    return problems


def _driver_verdict(facts: HostFacts) -> Optional[str]:
    driver, needed = major_minor(facts.driver_cuda), major_minor(facts.torch_cuda)
    if not driver or not needed or driver >= needed:
        return None
    needed_text = ".".join(str(part) for part in needed)
    return (f"driver supports CUDA {facts.driver_cuda}, this image needs {needed_text}: deploy on hosts "
            f"with CUDA >= {needed_text} (RunPod: allowedCudaVersions) or use the CUDA-12 image")


def _memory_verdict(facts: HostFacts, memory: Optional[ModelMemory], config: WorkerConfig) -> Optional[str]:
    if memory is None or not facts.gpus or facts.gpus[0].total_bytes is None:
        return None
    gpu = min(facts.gpus[: config.tensor_parallel_size], key=lambda g: g.total_bytes or 0)
    budget = int(gpu.total_bytes * config.gpu_memory_utilization)
    needed = memory.weight_bytes + memory.kv_bytes(config.max_model_len) + memory.overhead_bytes
    if needed <= budget:
        return None
    fixed = memory.weight_bytes + memory.overhead_bytes
    prefix = (f"model needs ~{_gib(needed)} GiB at MAX_MODEL_LEN={config.max_model_len}, GPU has "
              f"{_gib(budget)} GiB at GPU_MEMORY_UTILIZATION={config.gpu_memory_utilization}")
    next_tp = config.tensor_parallel_size * 2
    if fixed >= budget or memory.kv_bytes_per_layer_token == 0:
        return f"{prefix}: the weights alone do not fit: quantize or TENSOR_PARALLEL_SIZE={next_tp}"
    fitting_len = memory.longest_sequence(budget - fixed) // 256 * 256
    return f"{prefix}: lower MAX_MODEL_LEN to {fitting_len} / quantize / TENSOR_PARALLEL_SIZE={next_tp}"


def _gib(value: Optional[int]) -> str:
    return UNKNOWN if value is None else f"{value / GIB:.2f}"
