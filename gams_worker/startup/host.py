"""Facts of the host the worker starts on: GPUs, driver, and the CUDA versions torch and vLLM
were built for. Probes never raise and create no CUDA context in this process (that would
hold GPU memory for the life of the worker): they ask NVML, the driver and the builds' files.
What the facts mean is the doctor's business (gams_worker/startup/doctor.py).
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import logging
import mmap
import os
import re
from typing import Any, List, Optional, Tuple

from gams_worker.memory import GIB
from gams_worker.versions import cuda_from_version_tag

log = logging.getLogger(__name__)

UNKNOWN = "unknown"


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
    torch_cuda: str = UNKNOWN  # the CUDA version torch was built for, "13.0"
    vllm_version: str = UNKNOWN
    vllm_cuda: str = UNKNOWN  # the CUDA version vLLM's kernels were built for, "13.0" or "13"


def host_facts() -> HostFacts:
    """What is known of this host; never raises."""
    try:
        return collect_host_facts()
    except Exception as exc:  # the doctor must never stop the worker
        log.warning("could not examine the host: %r", exc)
        return HostFacts(platform=UNKNOWN)


def collect_host_facts() -> HostFacts:
    platform = _guard(platform_name, UNKNOWN)
    driver_version, driver_cuda, gpus = UNKNOWN, UNKNOWN, ()
    if platform != "cpu":
        nvml = _guard(_nvml_facts, None)
        if nvml is not None:
            driver_version, driver_cuda, gpus = nvml
        driver_cuda = _guard(_libcuda_driver_cuda, None) or driver_cuda
    return HostFacts(
        platform=platform,
        gpus=tuple(gpus),
        driver_version=driver_version,
        driver_cuda=driver_cuda,
        torch_version=_guard(lambda: __import__("torch").__version__, UNKNOWN),
        torch_cuda=_guard(_torch_cuda, UNKNOWN),
        vllm_version=_guard(lambda: __import__("vllm").__version__, UNKNOWN),
        vllm_cuda="none (CPU build)" if platform == "cpu" else _guard(vllm_built_cuda, UNKNOWN),
    )


def _guard(probe: Any, default: Any) -> Any:
    try:
        result = probe()
    except Exception as exc:
        log.debug("host probe %s failed: %r", getattr(probe, "__name__", probe), exc)
        return default
    return default if result is None else result


NO_PLATFORM = "none"


def platform_name() -> str:
    """vLLM's platform: "cuda", "cpu", ..."""
    from vllm.platforms import current_platform

    # vLLM's UnspecifiedPlatform (no GPU and not the CPU build) has an empty device type.
    return "cuda" if current_platform.is_cuda() else current_platform.device_type or NO_PLATFORM


def _torch_cuda() -> str:
    import torch

    return torch.version.cuda or "none (CPU build)"


def _cuda_version_text(encoded: int) -> str:
    """12040 -> "12.4", as the CUDA driver API encodes versions."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def _libcuda_driver_cuda() -> Optional[str]:
    """The highest CUDA version the driver supports (cuDriverGetVersion needs no cuInit)."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return _cuda_version_text(version.value)


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _nvml_facts() -> Optional[Tuple[str, str, List[GpuFacts]]]:
    """(driver version, driver's CUDA version, GPUs) from libnvidia-ml, or None without NVML."""
    nvml = ctypes.CDLL("libnvidia-ml.so.1")
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        text = ctypes.create_string_buffer(96)
        driver_version = UNKNOWN
        if nvml.nvmlSystemGetDriverVersion(text, 96) == 0:
            driver_version = text.value.decode()
        cuda = ctypes.c_int(0)
        driver_cuda = UNKNOWN
        if nvml.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(cuda)) == 0 and cuda.value > 0:
            driver_cuda = _cuda_version_text(cuda.value)
        count = ctypes.c_uint(0)
        gpus = []
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0:
            for index in range(count.value):
                gpus.append(_nvml_gpu(nvml, index))
        return driver_version, driver_cuda, gpus
    finally:
        nvml.nvmlShutdown()


def _nvml_gpu(nvml: Any, index: int) -> GpuFacts:
    handle = ctypes.c_void_p()
    if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
        return GpuFacts(UNKNOWN, UNKNOWN, None, None)
    name = ctypes.create_string_buffer(96)
    name_text = name.value.decode() if nvml.nvmlDeviceGetName(handle, name, 96) == 0 else UNKNOWN
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    capability = UNKNOWN
    if nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) == 0:
        capability = f"{major.value}.{minor.value}"
    memory = _NvmlMemory()
    if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == 0:
        return GpuFacts(name_text, capability, memory.total, memory.free)
    return GpuFacts(name_text, capability, None, None)


def vllm_built_cuda() -> str:
    """The CUDA version vLLM's kernels were built for: from its version tag, its
    extension's libcudart soname, or its dependencies; "unknown" if none says."""
    import vllm

    for probe in (lambda: cuda_from_version_tag(vllm.__version__),
                  lambda: _cudart_major_of_extensions(list(vllm.__path__)),
                  _cuda_runtime_requirement):
        found = _guard(probe, None)
        if found:
            return found
    return UNKNOWN


def _cudart_major_of_extensions(folders: List[str]) -> Optional[str]:
    for folder in folders:
        for extension in sorted(glob.glob(os.path.join(folder, "_C*.so"))):
            major = _linked_cudart_major(extension)
            if major:
                return major
    return None


def _cuda_runtime_requirement() -> Optional[str]:
    """The CUDA major version of the nvidia-cuda-runtime wheel that vLLM's distribution requires."""
    import importlib.metadata

    for requirement in importlib.metadata.requires("vllm") or []:
        match = re.match(r"nvidia-cuda-runtime-cu(\d+)", requirement) or re.match(
            r"nvidia-cuda-runtime\s*[=~<>]=\s*(\d+(?:\.\d+)?)", requirement)
        if match:
            return match.group(1)
    return None


def _linked_cudart_major(path: str) -> Optional[str]:
    """The NN of the libcudart.so.NN that an ELF file names (in its dynamic string table)."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        match = re.search(rb"libcudart\.so\.(\d+)", data)
        return match.group(1).decode() if match else None
