"""Where vLLM keeps what it compiles (torch.compile graphs, Inductor and Triton kernels).

A cold engine start spends most of its time compiling; with this cache warm the
compiling is skipped. On the network volume the cache outlives the worker, so every
later worker of the endpoint starts warm; in the container it helps restarts only.
Workers of different endpoints may share one volume, so the folder is keyed by model,
vLLM and torch versions, GPU and the form of the compiled artifact (vLLM hashes the rest
of its config inside it).

The form: with vLLM's mega AOT artifact, the compiled graphs of the whole model are saved
and loaded as one piece instead of graph by graph; loading took 0.5 s instead of 8.2 s on an
H100. vLLM turns it on by default only from torch 2.12; it needs torch 2.10 (``aot`` in
Inductor's standalone_compile) and vLLM's AOT compile, which the worker checks. Artifacts of
the two forms never share a folder, so a start never loads one written in the other form.

vLLM's engine process reads the folder and the form from its environment (``VLLM_CACHE_ROOT``,
``TRITON_CACHE_DIR``, ``VLLM_USE_MEGA_AOT_ARTIFACT``), which it inherits from this process.

A folder new to vLLM also lacks its model info (``modelinfos/``): without it vLLM inspects the
model class in a subprocess that imports torch and vLLM again (20 s on the H100). The image
computes it when it is built (builder/seed_model_info.py); the folder gets what it lacks of it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from gams_worker.config import WorkerConfig
from gams_worker.startup.host import HostFacts

log = logging.getLogger(__name__)

VOLUME_SUBDIR = os.path.join("gams-worker", "compile-cache")
CONTAINER_DIR = os.path.join(os.path.expanduser("~"), ".cache", "gams-worker", "compile-cache")
TRITON_SUBDIR = "triton"
MODEL_INFO_SUBDIR = "modelinfos"  # vLLM's model-info cache, not compiled code
# Oldest torch whose Inductor can save one artifact for the whole model (standalone_compile's aot).
MEGA_AOT_MIN_TORCH = (2, 10)
# Files that hold compiled code: Inductor's kernels and vLLM's graphs (.so, .py, .cubin, ...).
_ARTIFACT = re.compile(r"\.(so|py|cubin|ptx|hsaco|json|pt|bin)$|^model$")
# vLLM's log lines when it took its compiled graphs from the cache (0.25 on CUDA, 0.32 on CPU).
_LOADED_FROM_CACHE = re.compile(r"Directly load (?:AOT compilation|the compiled graph)")


@dataclasses.dataclass(frozen=True)
class MegaAot:
    """Whether vLLM saves and loads its compiled graphs as one mega AOT artifact, and why."""

    on: bool
    reason: str

    @property
    def folder(self) -> str:
        """The last part of the cache key: artifacts of the two forms never share a folder."""
        return "mega-aot-on" if self.on else "mega-aot-off"


@dataclasses.dataclass(frozen=True)
class VllmAotSupport:
    """What of the mega AOT artifact's needs this vLLM and its settings provide."""

    knows_mega_aot: bool  # this vLLM has VLLM_USE_MEGA_AOT_ARTIFACT
    aot_compile: bool  # VLLM_USE_AOT_COMPILE in effect (vLLM: on from torch 2.10 unless its cache is off)
    standalone_compile: bool  # VLLM_USE_STANDALONE_COMPILE in effect (vLLM asserts it for the mega artifact)

    def missing(self, torch_version: str) -> str:
        """Why the mega artifact cannot be used here, or "" when it can."""
        version = _major_minor(torch_version)
        if version is None or version < MEGA_AOT_MIN_TORCH:
            return f"torch {torch_version} is older than 2.10"
        if not self.knows_mega_aot:
            return "this vLLM has no mega AOT artifact"
        if not self.aot_compile:
            return "vLLM's AOT compile is off (VLLM_USE_AOT_COMPILE or VLLM_DISABLE_COMPILE_CACHE)"
        if not self.standalone_compile:
            return "VLLM_USE_STANDALONE_COMPILE is off"
        return ""


def vllm_aot_support() -> VllmAotSupport:
    """Asks the imported vLLM: its envs module evaluates its variables as its engine will."""
    try:
        import vllm.envs as vllm_envs

        return VllmAotSupport(knows_mega_aot="VLLM_USE_MEGA_AOT_ARTIFACT" in vllm_envs.environment_variables,
                              aot_compile=bool(vllm_envs.VLLM_USE_AOT_COMPILE),
                              standalone_compile=bool(vllm_envs.VLLM_USE_STANDALONE_COMPILE))
    except Exception as exc:  # no vLLM, or one without these variables: no mega artifact
        log.warning("compile cache: cannot ask vLLM about AOT compile (%r)", exc)
        return VllmAotSupport(False, False, False)


def decide_mega_aot(requested: Optional[bool], torch_version: str, support: VllmAotSupport) -> MegaAot:
    """On where it works, unless MEGA_AOT_ARTIFACT (or vLLM's own variable) turns it off."""
    if requested is False:
        return MegaAot(False, "turned off by MEGA_AOT_ARTIFACT")
    missing = support.missing(torch_version)
    if missing:
        if requested:
            log.warning("MEGA_AOT_ARTIFACT is on, but %s: vLLM saves its compiled graphs one by one", missing)
        return MegaAot(False, missing)
    if requested:
        return MegaAot(True, "turned on by MEGA_AOT_ARTIFACT")
    return MegaAot(True, f"torch {torch_version} supports it; vLLM's own default is on only from torch 2.12")


@dataclasses.dataclass(frozen=True)
class ArtifactCount:
    compiled: int  # all compiled files, Triton's included
    triton: int  # Triton's kernel files alone


@dataclasses.dataclass(frozen=True)
class CompileCache:
    """The folder of one engine start, and what it held before that start."""

    path: str
    location: str  # "network volume", "container", "COMPILE_CACHE_DIR" or "VLLM_CACHE_ROOT"
    before: ArtifactCount
    mega_aot: MegaAot
    model_info_seeded: Tuple[str, ...] = ()  # files copied from the image's seed (seed_model_info)

    def engine_environment(self) -> Dict[str, str]:
        """Variables vLLM's engine process must see to read and write this cache."""
        return {"VLLM_CACHE_ROOT": self.path, "TRITON_CACHE_DIR": os.path.join(self.path, TRITON_SUBDIR),
                "VLLM_USE_MEGA_AOT_ARTIFACT": "1" if self.mega_aot.on else "0"}

    def report(self, engine_output: str) -> Dict[str, Any]:
        """After the engine started: was the cache hit? For the log and the first job's metadata.

        A hit means the folder held compiled code for this start and the start compiled
        nothing new. vLLM's CPU build reuses the kernels but not its own graph wrapper
        (it logs a load failure and re-traces), so counting new files is the common test.
        Triton's kernels are counted apart: a start that compiled none loaded them all.
        """
        after = count_artifacts(self.path)
        report = {
            "path": self.path,
            "location": self.location,
            "mega_aot_artifact": self.mega_aot.on,
            "artifacts_before": self.before.compiled,
            "new_artifacts": after.compiled - self.before.compiled,
            "triton_kernel_files_before": self.before.triton,
            "new_triton_kernel_files": after.triton - self.before.triton,
            "vllm_loaded_graphs": bool(_LOADED_FROM_CACHE.search(engine_output)),
            "model_info_seeded": list(self.model_info_seeded),
        }
        report["hit"] = self.before.compiled > 0 and (report["new_artifacts"] == 0 or report["vllm_loaded_graphs"])
        log.info("compile cache %s: %s (%s), %d compiled files before the start, %d new; Triton kernel "
                 "files %d before, %d new; mega AOT artifact %s",
                 "hit" if report["hit"] else "miss", self.path, self.location, self.before.compiled,
                 report["new_artifacts"], self.before.triton, report["new_triton_kernel_files"],
                 "on" if self.mega_aot.on else "off")
        return report


def cache_key(config: WorkerConfig, facts: HostFacts, mega_aot: MegaAot) -> str:
    """model/vllm-torch/device/form, readable, e.g.
    cjvt--GaMS-9B-Instruct/vllm-0.25.1_torch-2.11.0+cu130/1xNVIDIA-H100-80GB-HBM3_sm9.0/mega-aot-on"""
    model = config.model_name + (f"@{config.model_revision}" if config.model_revision else "")
    versions = f"vllm-{facts.vllm_version}_torch-{facts.torch_version}"
    if facts.gpus:
        gpu = facts.gpus[0]
        device = f"{len(facts.gpus)}x{gpu.name}_sm{gpu.compute_capability}"
    else:
        device = facts.platform
    return os.path.join(*(_slug(part) for part in (model, versions, device, mega_aot.folder)))


def choose_compile_cache(config: WorkerConfig, facts: HostFacts,
                         support: Optional[VllmAotSupport] = None) -> CompileCache:
    """The keyed folder on the network volume if one is mounted, else in the container.

    ``support``: what vLLM provides for the mega AOT artifact (default: ask the imported vLLM).
    """
    mega_aot = decide_mega_aot(config.mega_aot_artifact, facts.torch_version,
                               vllm_aot_support() if support is None else support)
    log.info("compile cache: mega AOT artifact %s (%s)", "on" if mega_aot.on else "off", mega_aot.reason)
    seed = config.model_info_seed_dir
    if config.vllm_cache_root:  # the user chose vLLM's own cache folder: use it as it is
        return _prepared(config.vllm_cache_root, "VLLM_CACHE_ROOT", mega_aot, seed)
    key = cache_key(config, facts, mega_aot)
    if config.compile_cache_dir:
        return _prepared(os.path.join(config.compile_cache_dir, key), "COMPILE_CACHE_DIR", mega_aot, seed)
    if os.path.isdir(config.network_volume_path):
        path = os.path.join(config.network_volume_path, VOLUME_SUBDIR, key)
        try:
            return _prepared(path, "network volume", mega_aot, seed)
        except OSError as exc:  # a read-only or full volume must not stop the worker
            log.warning("compile cache: cannot use %s (%s); keeping it in the container", path, exc)
    return _prepared(os.path.join(CONTAINER_DIR, key), "container", mega_aot, seed)


def seed_model_info(cache_root: str, seed_dir: str) -> Tuple[str, ...]:
    """Copy the seed's model-info files that ``cache_root`` lacks; the names copied.

    vLLM stores its model module's hash in each file and checks it: a seed from another vLLM
    is a miss (vLLM inspects the class itself, as without a seed), never a wrong answer.
    """
    source = Path(seed_dir) / MODEL_INFO_SUBDIR
    if not source.is_dir():
        return ()
    target = Path(cache_root) / MODEL_INFO_SUBDIR
    copied = []
    for path in sorted(source.glob("*.json")):
        if not (target / path.name).exists():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / path.name)
            copied.append(path.name)
    return tuple(copied)


def count_artifacts(path: str) -> ArtifactCount:
    """Compiled files under ``path``, in one walk (on a network volume each folder is a round trip)."""
    triton_dir = os.path.join(path, TRITON_SUBDIR)
    compiled = triton = 0
    for folder, dirs, files in os.walk(path):
        if folder == path and MODEL_INFO_SUBDIR in dirs:
            dirs.remove(MODEL_INFO_SUBDIR)  # model facts, not compiled code
        count = sum(1 for name in files if _ARTIFACT.search(name))
        compiled += count
        if folder == triton_dir or folder.startswith(triton_dir + os.sep):
            triton += count
    return ArtifactCount(compiled, triton)


def _prepared(path: str, location: str, mega_aot: MegaAot, model_info_seed: str) -> CompileCache:
    os.makedirs(path, exist_ok=True)
    try:
        seeded = seed_model_info(path, model_info_seed)
    except OSError as exc:  # vLLM then inspects the model class itself, 20 s later
        log.warning("compile cache: could not copy vLLM's model info from %s into %s: %s", model_info_seed, path, exc)
        seeded = ()
    if seeded:
        log.info("compile cache: vLLM's model info (%s) copied from the image's %s: vLLM need not inspect "
                 "the model class in a subprocess", ", ".join(seeded), model_info_seed)
    return CompileCache(path=path, location=location, before=count_artifacts(path), mega_aot=mega_aot,
                        model_info_seeded=seeded)


def _major_minor(version: str) -> Optional[Tuple[int, int]]:
    match = re.match(r"^(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def _slug(text: str) -> str:
    text = text.strip("/").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._+@-]+", "-", text) or "-"
