"""Facts of the host the worker starts on: vLLM's platform, the GPUs, the driver, torch and vLLM.

Probes never raise and create no CUDA context in this process (it would hold GPU memory for the
worker's life): GPUs come from vLLM's platform API and NVML. The doctor judges them (doctor.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Iterator, Optional, Tuple

from gams_worker.memory import GIB

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
NO_PLATFORM = "none"
# The compute capabilities the lock's torch (2.13.0+cu130) has kernels for, a fact the lock fixes: asking
# torch (_cuda_getArchFlags) initializes CUDA here, and vLLM's engine process, forked after, then fails.
TORCH_CUDA_ARCHES = (75, 80, 86, 90, 100, 120)


@dataclasses.dataclass(frozen=True)
class GpuFacts:
    name: str
    compute_capability: str  # "9.0"
    total_bytes: Optional[int]
    free_bytes: Optional[int]

    @property
    def total_gib(self) -> Optional[float]:
        return self.total_bytes / GIB if self.total_bytes else None


@dataclasses.dataclass(frozen=True)
class HostFacts:
    platform: str  # "cuda", "cpu", ...
    gpus: Tuple[GpuFacts, ...] = ()
    driver_version: str = UNKNOWN  # "580.82.07"
    driver_cuda: str = UNKNOWN  # the highest CUDA version the driver supports, "12.4"
    torch_version: str = UNKNOWN
    torch_cuda: str = UNKNOWN  # the CUDA version torch (and so the lock's vLLM) was built for, "13.0"
    vllm_version: str = UNKNOWN
    cuda_arches: Tuple[int, ...] = ()  # compute capabilities torch was built for (75 for sm_75); () unknown


def host_facts() -> HostFacts:
    """What is known of this host; never raises."""
    try:
        return collect_host_facts()
    except Exception as exc:  # the doctor must never stop the worker
        log.warning("could not examine the host: %r", exc)
        return HostFacts(platform=UNKNOWN)


def collect_host_facts() -> HostFacts:
    platform = _guard(platform_name, UNKNOWN)
    driver_version, driver_cuda = _guard(_driver, (UNKNOWN, UNKNOWN)) if platform != "cpu" else (UNKNOWN, UNKNOWN)
    return HostFacts(platform, _guard(_gpus, ()), driver_version, driver_cuda,
                     torch_version=_guard(lambda: __import__("torch").__version__, UNKNOWN),
                     torch_cuda=_guard(lambda: __import__("torch").version.cuda or "none (CPU build)", UNKNOWN),
                     vllm_version=_guard(lambda: __import__("vllm").__version__, UNKNOWN),
                     cuda_arches=TORCH_CUDA_ARCHES if platform == "cuda" else ())


def _guard(probe: Any, default: Any) -> Any:
    try:
        result = probe()
    except Exception as exc:
        log.debug("host probe %s failed: %r", getattr(probe, "__name__", probe), exc)
        return default
    return default if result is None else result


def platform_name() -> str:
    """vLLM's platform: "cuda", "cpu", ..."""
    from vllm.platforms import current_platform

    # vLLM's UnspecifiedPlatform (no GPU and not the CPU build) has an empty device type.
    return "cuda" if current_platform.is_cuda() else current_platform.device_type or NO_PLATFORM


def _gpus() -> Tuple[GpuFacts, ...]:
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return ()
    return tuple(_gpu(current_platform, index) for index in range(current_platform.device_count()))


def _gpu(platform: Any, index: int) -> GpuFacts:
    capability = platform.get_device_capability(index)
    total, free = _guard(lambda: _memory(platform.device_id_to_physical_device_id(index)), (None, None))
    return GpuFacts(platform.get_device_name(index), f"{capability.major}.{capability.minor}" if capability else UNKNOWN,
                    total, free)


@contextlib.contextmanager
def _nvml() -> Iterator[Any]:
    from vllm.utils.import_utils import import_pynvml

    nvml = import_pynvml()
    nvml.nvmlInit()
    try:
        yield nvml
    finally:
        nvml.nvmlShutdown()


def _memory(physical_index: int) -> Tuple[int, int]:
    """(total, free) bytes: vLLM's platform tells the total only; torch.cuda.mem_get_info would make a context."""
    with _nvml() as nvml:
        memory = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(physical_index))
        return int(memory.total), int(memory.free)





def _driver() -> Tuple[str, str]:
    """The driver's version and the highest CUDA version it supports (12040 -> "12.4")."""
    with _nvml() as nvml:
        cuda = nvml.nvmlSystemGetCudaDriverVersion_v2()
        return nvml.nvmlSystemGetDriverVersion(), f"{cuda // 1000}.{cuda % 1000 // 10}"
