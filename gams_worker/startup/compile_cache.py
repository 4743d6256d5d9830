"""Where vLLM keeps what it compiles (torch.compile graphs, Inductor and Triton kernels).

A cold engine start spends most of its time compiling; with this cache warm the
compiling is skipped. On the network volume the cache outlives the worker, so every
later worker of the endpoint starts warm; in the container it helps restarts only.
Workers of different endpoints may share one volume, so the folder is keyed by model,
vLLM and torch versions and GPU (vLLM hashes the rest of its config inside it).

vLLM's engine process reads the folder from its environment (``VLLM_CACHE_ROOT``,
``TRITON_CACHE_DIR``), which it inherits from this process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Dict

from gams_worker.config import WorkerConfig
from gams_worker.startup.host import HostFacts

log = logging.getLogger(__name__)

VOLUME_SUBDIR = os.path.join("gams-worker", "compile-cache")
CONTAINER_DIR = os.path.join(os.path.expanduser("~"), ".cache", "gams-worker", "compile-cache")
# Files that hold compiled code: Inductor's kernels and vLLM's graphs (.so, .py, .cubin, ...).
_ARTIFACT = re.compile(r"\.(so|py|cubin|ptx|hsaco|json|pt|bin)$|^model$")
# vLLM's log lines when it took its compiled graphs from the cache (0.25 on CUDA, 0.32 on CPU).
_LOADED_FROM_CACHE = re.compile(r"Directly load (?:AOT compilation|the compiled graph)")


@dataclasses.dataclass(frozen=True)
class CompileCache:
    """The folder of one engine start, and what it held before that start."""

    path: str
    location: str  # "network volume", "container", "COMPILE_CACHE_DIR" or "VLLM_CACHE_ROOT"
    artifacts_before: int

    def engine_environment(self) -> Dict[str, str]:
        """Variables vLLM's engine process must see to read and write this cache."""
        return {"VLLM_CACHE_ROOT": self.path, "TRITON_CACHE_DIR": os.path.join(self.path, "triton")}

    def report(self, engine_output: str) -> Dict[str, Any]:
        """After the engine started: was the cache hit? For the log and the first job's metadata.

        A hit means the folder held compiled code for this start and the start compiled
        nothing new. vLLM's CPU build reuses the kernels but not its own graph wrapper
        (it logs a load failure and re-traces), so counting new files is the common test.
        """
        artifacts_after = count_artifacts(self.path)
        report = {
            "path": self.path,
            "location": self.location,
            "artifacts_before": self.artifacts_before,
            "new_artifacts": artifacts_after - self.artifacts_before,
            "vllm_loaded_graphs": bool(_LOADED_FROM_CACHE.search(engine_output)),
        }
        report["hit"] = self.artifacts_before > 0 and (report["new_artifacts"] == 0 or report["vllm_loaded_graphs"])
        log.info("compile cache %s: %s (%s), %d compiled files before the start, %d new",
                 "hit" if report["hit"] else "miss", self.path, self.location,
                 self.artifacts_before, report["new_artifacts"])
        return report


def cache_key(config: WorkerConfig, facts: HostFacts) -> str:
    """model/vllm-torch/device, readable, e.g. cjvt--GaMS-9B-Instruct/vllm-0.25.0_torch-2.11.0+cu130/1xNVIDIA-H100-80GB-HBM3_sm9.0"""
    model = config.model_name + (f"@{config.model_revision}" if config.model_revision else "")
    versions = f"vllm-{facts.vllm_version}_torch-{facts.torch_version}"
    if facts.gpus:
        gpu = facts.gpus[0]
        device = f"{len(facts.gpus)}x{gpu.name}_sm{gpu.compute_capability}"
    else:
        device = facts.platform
    return os.path.join(*(_slug(part) for part in (model, versions, device)))


def choose_compile_cache(config: WorkerConfig, facts: HostFacts) -> CompileCache:
    """The keyed folder on the network volume if one is mounted, else in the container."""
    if config.vllm_cache_root:  # the user chose vLLM's own cache folder: use it as it is
        return _prepared(config.vllm_cache_root, "VLLM_CACHE_ROOT")
    key = cache_key(config, facts)
    if config.compile_cache_dir:
        return _prepared(os.path.join(config.compile_cache_dir, key), "COMPILE_CACHE_DIR")
    if os.path.isdir(config.network_volume_path):
        path = os.path.join(config.network_volume_path, VOLUME_SUBDIR, key)
        try:
            return _prepared(path, "network volume")
        except OSError as exc:  # a read-only or full volume must not stop the worker
            log.warning("compile cache: cannot use %s (%s); keeping it in the container", path, exc)
    return _prepared(os.path.join(CONTAINER_DIR, key), "container")


def count_artifacts(path: str) -> int:
    count = 0
    for _folder, _dirs, files in os.walk(path):
        count += sum(1 for name in files if _ARTIFACT.search(name))
    return count


def _prepared(path: str, location: str) -> CompileCache:
    os.makedirs(path, exist_ok=True)
    return CompileCache(path=path, location=location, artifacts_before=count_artifacts(path))


def _slug(text: str) -> str:
    text = text.strip("/").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._+@-]+", "-", text) or "-"
