"""The folder where vLLM keeps what it compiles, so warm starts skip compiling. vLLM keys what it saves by
its own hash; the worker only chooses the folder (the first writable one with room), seeds vLLM's model info
from the image, sets aside one whose content broke a start, and reports hit or miss."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from gams_worker.config import WorkerConfig
from gams_worker.startup.volume import folder_problem

log = logging.getLogger(__name__)

VOLUME_SUBDIR = os.path.join("gams-worker", "compile-cache")
CONTAINER_DIR = os.path.join(os.path.expanduser("~"), ".cache", "gams-worker", "compile-cache")
TEMPORARY_DIR = os.path.join(tempfile.gettempdir(), "gams-worker", "compile-cache")  # the last resort
# Room a folder needs: vLLM writes temporary files beside the cache while it compiles.
MIN_FREE_BYTES = 1 << 30
TRITON_SUBDIR = "triton"
MODEL_INFO_SUBDIR = "modelinfos"  # vLLM's model-info cache, not compiled code
# vLLM's own switch (0.32) for reusing a start's memory profile: only where a card has the free memory it had.
STARTUP_PLAN = "VLLM_ENABLE_STARTUP_PLAN"
_ARTIFACT = re.compile(r"\.(so|py|cubin|ptx|hsaco|json|pt|bin)$|^model$")
# vLLM's lines when it took its graphs from the cache (CUDA and CPU builds word it apart) ...
_LOADED_FROM_CACHE = re.compile(r"Directly load (?:AOT compilation|the compiled graph)")
# ... and when its saved graphs would not load (a damaged file; its CPU build on every warm start).
_RECOMPILED_AFTER_LOAD_FAILURE = re.compile(r"Compiling model again due to a load failure")


@dataclasses.dataclass(frozen=True)
class ArtifactCount:
    compiled: int  # all compiled files, Triton's included
    triton: int  # Triton's kernel files alone


@dataclasses.dataclass(frozen=True)
class CompileCache:
    path: str
    location: str  # "network volume", "container", "COMPILE_CACHE_DIR", "VLLM_CACHE_ROOT" or "temporary folder"
    before: ArtifactCount
    model_info_seeded: Tuple[str, ...] = ()  # files copied from the image's seed (seed_model_info)
    model_info_seed_dir: str = ""
    set_aside: Tuple[str, ...] = ()  # where a damaged folder at ``path`` was moved this start
    disabled: bool = False  # no folder could be written: vLLM compiles without saving

    def engine_environment(self) -> Dict[str, str]:
        environment = {"VLLM_CACHE_ROOT": self.path, "TRITON_CACHE_DIR": os.path.join(self.path, TRITON_SUBDIR)}
        if self.disabled:
            environment["VLLM_DISABLE_COMPILE_CACHE"] = "1"
        return environment

    def engine_defaults(self) -> Dict[str, str]:
        """vLLM's variables the worker sets only where the deployment did not: vLLM keeps the KV cache size it
        profiled beside the compiled graphs, and a warm start on the same card skips profiling."""
        return {} if self.disabled else {STARTUP_PLAN: "1"}

    def emptied(self) -> "CompileCache":
        """This folder moved aside unread (its content broke an engine start) and made anew, empty."""
        aside = set_aside(self.path)
        fresh = _prepared(self.path, self.location, self.model_info_seed_dir)
        return dataclasses.replace(fresh, set_aside=self.set_aside + (aside,))

    def report(self, engine_output: str) -> Dict[str, Any]:
        """Hit or miss, for the log and the first job's metadata: a hit held compiled code and compiled nothing
        new, or vLLM says it loaded its graphs (its CPU build reuses the kernels but traces its graphs again)."""
        after = count_artifacts(self.path)
        recompiled = bool(_RECOMPILED_AFTER_LOAD_FAILURE.search(engine_output))
        report = {"path": self.path, "location": self.location, "artifacts_before": self.before.compiled,
                  "new_artifacts": after.compiled - self.before.compiled,
                  "triton_kernel_files_before": self.before.triton,
                  "new_triton_kernel_files": after.triton - self.before.triton,
                  "vllm_loaded_graphs": bool(_LOADED_FROM_CACHE.search(engine_output)),
                  "vllm_recompiled_after_load_failure": recompiled,
                  "model_info_seeded": list(self.model_info_seeded), "set_aside": list(self.set_aside)}
        report["hit"] = self.before.compiled > 0 and (report["new_artifacts"] == 0 or report["vllm_loaded_graphs"])
        log.info("compile cache %s: %s (%s), %d compiled files before the start, %d new; Triton kernel "
                 "files %d before, %d new%s", "hit" if report["hit"] else "miss", self.path, self.location,
                 self.before.compiled, report["new_artifacts"], self.before.triton, report["new_triton_kernel_files"],
                 "; vLLM could not load its saved graphs and traced them again" if recompiled else "")
        return report


def choose_compile_cache(config: WorkerConfig) -> CompileCache:
    """The first usable of: VLLM_CACHE_ROOT, else COMPILE_CACHE_DIR, else the network volume's folder if
    one is mounted (unless COMPILE_CACHE_ON_VOLUME=false); then the container's, then a temporary folder.
    Usable: writable, with MIN_FREE_BYTES free."""
    candidates: List[Tuple[str, str]] = []
    if config.vllm_cache_root:
        candidates.append((config.vllm_cache_root, "VLLM_CACHE_ROOT"))
    elif config.compile_cache_dir:
        candidates.append((config.compile_cache_dir, "COMPILE_CACHE_DIR"))
    elif config.compile_cache_on_volume and os.path.isdir(config.network_volume_path):
        candidates.append((os.path.join(config.network_volume_path, VOLUME_SUBDIR), "network volume"))
    candidates += [(CONTAINER_DIR, "container"), (TEMPORARY_DIR, "temporary folder")]
    passed_over: List[str] = []
    for path, location in candidates:
        problem = folder_problem(path, MIN_FREE_BYTES)
        if problem is None:
            cache = _prepared(path, location, config.model_info_seed_dir)
            if passed_over:
                log.warning("compile cache: %s; keeping it in the %s folder %s instead",
                            "; ".join(passed_over), location, path)
            if location == "network volume":
                log.info("compile cache: on the network volume, whose writers can run code in this worker "
                         "(README, \"Trust boundary: the network volume\"); COMPILE_CACHE_ON_VOLUME=false keeps it in the container")
            return cache
        passed_over.append(f"cannot use the {location} folder: {problem}")
    log.warning("compile cache: %s; vLLM compiles every start and saves nothing", "; ".join(passed_over))
    return CompileCache(path=candidates[-1][0], location="none", before=ArtifactCount(0, 0), disabled=True)


def seed_model_info(cache_root: str, seed_dir: str) -> Tuple[str, ...]:
    """Copy the seed's model-info files that ``cache_root`` lacks; the names copied. vLLM checks the hash
    of the model's module stored in each: a seed from another vLLM is a miss, never a wrong answer."""
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


def _prepared(path: str, location: str, model_info_seed: str) -> CompileCache:
    os.makedirs(path, exist_ok=True)
    try:
        seeded = seed_model_info(path, model_info_seed)
    except OSError as exc:  # vLLM then inspects the model class itself, in a subprocess
        log.warning("compile cache: could not copy vLLM's model info from %s into %s: %s", model_info_seed, path, exc)
        seeded = ()
    if seeded:
        log.info("compile cache: vLLM's model info (%s) copied from the image's %s: vLLM need not inspect "
                 "the model class in a subprocess", ", ".join(seeded), model_info_seed)
    return CompileCache(path=path, location=location, before=count_artifacts(path), model_info_seeded=seeded,
                        model_info_seed_dir=model_info_seed)


def set_aside(path: str) -> str:
    """Move the folder ``path`` to a sibling ``<path>.damaged-<time>`` and make ``path`` anew, empty; returns the
    sibling. Only the newest sibling is kept: on a network volume they would pile up."""
    parent, name = os.path.split(os.path.normpath(path))
    for older in glob.glob(os.path.join(glob.escape(parent), f"{glob.escape(name)}.damaged-*")):
        shutil.rmtree(older, ignore_errors=True)
    aside = os.path.join(parent, f"{name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):  # another worker moved it first
        os.rename(path, aside)
    os.makedirs(path, exist_ok=True)
    return aside
