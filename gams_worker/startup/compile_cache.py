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

What the folder holds is code this process and vLLM's run (shared objects, Python modules,
pickles), so a keyed folder must prove what wrote it: the worker writes a manifest into each
new folder (model, vLLM and torch versions, device, artifact form) and sets aside, unread, a
folder whose manifest differs or that holds files without one. A folder is probed before it is
chosen (gams_worker/startup/volume.py): a read-only or full volume is passed over for the
container, with one warning line. A folder whose content breaks the engine's start (a
truncated kernel) is set aside by the fallback ladder (gams_worker/startup/ladder.py), which
then starts once more in the same mode with an empty folder. ``VLLM_CACHE_ROOT`` set by the user
is used as it is: neither keyed nor checked.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from gams_worker.config import WorkerConfig
from gams_worker.startup.host import HostFacts
from gams_worker.startup.volume import PROBE_PREFIX, folder_problem
from gams_worker.versions import major_minor

log = logging.getLogger(__name__)

VOLUME_SUBDIR = os.path.join("gams-worker", "compile-cache")
CONTAINER_DIR = os.path.join(os.path.expanduser("~"), ".cache", "gams-worker", "compile-cache")
# The last resort when neither the chosen folder nor the container's can be written.
TEMPORARY_DIR = os.path.join(tempfile.gettempdir(), "gams-worker", "compile-cache")
# Free space a folder needs to be chosen: a whole cache for GaMS-9B is 41 MB, and vLLM writes
# temporary files beside it while it compiles.
MIN_FREE_BYTES = 1 << 30
# The manifest of a keyed folder: what wrote it (see the module docstring).
MANIFEST_NAME = "gams-worker-cache.json"
MANIFEST_FORMAT = 1
TRITON_SUBDIR = "triton"
MODEL_INFO_SUBDIR = "modelinfos"  # vLLM's model-info cache, not compiled code
# Oldest torch whose Inductor can save one artifact for the whole model (standalone_compile's aot).
MEGA_AOT_MIN_TORCH = (2, 10)
# Files that hold compiled code: Inductor's kernels and vLLM's graphs (.so, .py, .cubin, ...).
_ARTIFACT = re.compile(r"\.(so|py|cubin|ptx|hsaco|json|pt|bin)$|^model$")
# vLLM's log lines when it took its compiled graphs from the cache (its CUDA and CPU builds word it apart).
_LOADED_FROM_CACHE = re.compile(r"Directly load (?:AOT compilation|the compiled graph)")
# vLLM's line when its saved graphs would not load and it traced them anew (a damaged file; and
# on every warm start of its CPU build, which cannot load its own graph wrapper).
_RECOMPILED_AFTER_LOAD_FAILURE = re.compile(r"Compiling model again due to a load failure")


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
        version = major_minor(torch_version)
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
    location: str  # "network volume", "container", "COMPILE_CACHE_DIR", "VLLM_CACHE_ROOT" or "temporary folder"
    before: ArtifactCount
    mega_aot: MegaAot
    model_info_seeded: Tuple[str, ...] = ()  # files copied from the image's seed (seed_model_info)
    identity: Optional[Dict[str, Any]] = None  # the manifest of a keyed folder; None: VLLM_CACHE_ROOT, unchecked
    model_info_seed_dir: str = ""
    set_aside: Tuple[str, ...] = ()  # where a foreign or damaged folder at ``path`` was moved this start
    disabled: bool = False  # no folder could be written: vLLM compiles without saving

    def engine_environment(self) -> Dict[str, str]:
        """Variables vLLM's engine process must see to read and write this cache."""
        environment = {"VLLM_CACHE_ROOT": self.path, "TRITON_CACHE_DIR": os.path.join(self.path, TRITON_SUBDIR),
                       "VLLM_USE_MEGA_AOT_ARTIFACT": "1" if self.mega_aot.on else "0"}
        if self.disabled:
            environment["VLLM_DISABLE_COMPILE_CACHE"] = "1"
        return environment

    def emptied(self) -> "CompileCache":
        """This folder moved aside unread (its content broke an engine start) and made anew, empty."""
        aside = set_aside(self.path, "damaged")
        fresh = _prepared(self.path, self.location, self.mega_aot, self.model_info_seed_dir, self.identity)
        return dataclasses.replace(fresh, set_aside=self.set_aside + fresh.set_aside + (aside,))

    def report(self, engine_output: str) -> Dict[str, Any]:
        """After the engine started: was the cache hit? For the log and the first job's metadata.

        A hit means the folder held compiled code for this start and the start compiled
        nothing new. vLLM's CPU build reuses the kernels but not its own graph wrapper
        (it logs a load failure and re-traces), so counting new files is the common test;
        vLLM's load-failure line is reported apart. Triton's kernels are counted apart:
        a start that compiled none loaded them all.
        """
        after = count_artifacts(self.path)
        recompiled = bool(_RECOMPILED_AFTER_LOAD_FAILURE.search(engine_output))
        report = {
            "path": self.path,
            "location": self.location,
            "mega_aot_artifact": self.mega_aot.on,
            "artifacts_before": self.before.compiled,
            "new_artifacts": after.compiled - self.before.compiled,
            "triton_kernel_files_before": self.before.triton,
            "new_triton_kernel_files": after.triton - self.before.triton,
            "vllm_loaded_graphs": bool(_LOADED_FROM_CACHE.search(engine_output)),
            "vllm_recompiled_after_load_failure": recompiled,
            "model_info_seeded": list(self.model_info_seeded),
            "set_aside": list(self.set_aside),
        }
        report["hit"] = self.before.compiled > 0 and (report["new_artifacts"] == 0 or report["vllm_loaded_graphs"])
        log.info("compile cache %s: %s (%s), %d compiled files before the start, %d new; Triton kernel "
                 "files %d before, %d new; mega AOT artifact %s%s",
                 "hit" if report["hit"] else "miss", self.path, self.location, self.before.compiled,
                 report["new_artifacts"], self.before.triton, report["new_triton_kernel_files"],
                 "on" if self.mega_aot.on else "off",
                 "; vLLM could not load its saved graphs and traced them again" if recompiled else "")
        return report


def _key_parts(config: WorkerConfig, facts: HostFacts, mega_aot: MegaAot) -> Tuple[str, str, str, str]:
    model = config.model_name + (f"@{config.model_revision}" if config.model_revision else "")
    versions = f"vllm-{facts.vllm_version}_torch-{facts.torch_version}"
    if facts.gpus:
        gpu = facts.gpus[0]
        device = f"{len(facts.gpus)}x{gpu.name}_sm{gpu.compute_capability}"
    else:
        device = facts.platform
    return model, versions, device, mega_aot.folder


def cache_key(config: WorkerConfig, facts: HostFacts, mega_aot: MegaAot) -> str:
    """model/vllm-torch/device/form, readable, e.g.
    cjvt--GaMS-9B-Instruct/vllm-0.25.1_torch-2.11.0+cu130/1xNVIDIA-H100-80GB-HBM3_sm9.0/mega-aot-on"""
    return os.path.join(*(_slug(part) for part in _key_parts(config, facts, mega_aot)))


def cache_identity(config: WorkerConfig, facts: HostFacts, mega_aot: MegaAot) -> Dict[str, Any]:
    """What a keyed folder's manifest must say: the key's parts unslugged, so two keys that
    slug alike (or a folder copied under another key) still differ."""
    model, _, device, _ = _key_parts(config, facts, mega_aot)
    return {"format": MANIFEST_FORMAT, "model": model, "vllm": facts.vllm_version, "torch": facts.torch_version,
            "device": device, "mega_aot_artifact": mega_aot.on}


def choose_compile_cache(config: WorkerConfig, facts: HostFacts,
                         support: Optional[VllmAotSupport] = None) -> CompileCache:
    """The first usable of: VLLM_CACHE_ROOT as it is, or the keyed folder under COMPILE_CACHE_DIR,
    or on the network volume if one is mounted (unless COMPILE_CACHE_ON_VOLUME=false); then
    the container's, then a temporary folder. Usable: writable, with MIN_FREE_BYTES free.

    ``support``: what vLLM provides for the mega AOT artifact (default: ask the imported vLLM).
    """
    mega_aot = decide_mega_aot(config.mega_aot_artifact, facts.torch_version,
                               vllm_aot_support() if support is None else support)
    log.info("compile cache: mega AOT artifact %s (%s)", "on" if mega_aot.on else "off", mega_aot.reason)
    seed = config.model_info_seed_dir
    key, identity = cache_key(config, facts, mega_aot), cache_identity(config, facts, mega_aot)
    candidates: List[Tuple[str, str, Optional[Dict[str, Any]]]] = []
    if config.vllm_cache_root:  # the user chose vLLM's own cache folder: use it as it is
        candidates.append((config.vllm_cache_root, "VLLM_CACHE_ROOT", None))
    elif config.compile_cache_dir:
        candidates.append((os.path.join(config.compile_cache_dir, key), "COMPILE_CACHE_DIR", identity))
    elif config.compile_cache_on_volume and os.path.isdir(config.network_volume_path):
        candidates.append((os.path.join(config.network_volume_path, VOLUME_SUBDIR, key), "network volume", identity))
    candidates += [(os.path.join(CONTAINER_DIR, key), "container", identity),
                   (os.path.join(TEMPORARY_DIR, key), "temporary folder", identity)]
    passed_over: List[str] = []
    for path, location, expected in candidates:
        problem = folder_problem(path, MIN_FREE_BYTES)
        if problem is None:
            try:
                cache = _prepared(path, location, mega_aot, seed, expected)
            except OSError as exc:  # e.g. a foreign folder that cannot be moved aside
                problem = f"{path} cannot be prepared ({exc.strerror or exc})"
            else:
                if passed_over:
                    log.warning("compile cache: %s; keeping it in the %s folder %s instead",
                                "; ".join(passed_over), location, path)
                if location == "network volume":
                    log.info("compile cache: on the network volume, whose writers can run code in this worker "
                             "(README, \"Trust boundary: the network volume\"); COMPILE_CACHE_ON_VOLUME=false keeps it in the container")
                return cache
        passed_over.append(f"cannot use the {location} folder: {problem}")
    log.warning("compile cache: %s; vLLM compiles every start and saves nothing", "; ".join(passed_over))
    return CompileCache(path=candidates[-1][0], location="none", before=ArtifactCount(0, 0), mega_aot=mega_aot,
                        disabled=True)


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
        count = sum(1 for name in files if _ARTIFACT.search(name) and not (folder == path and name == MANIFEST_NAME))
        compiled += count
        if folder == triton_dir or folder.startswith(triton_dir + os.sep):
            triton += count
    return ArtifactCount(compiled, triton)


def _prepared(path: str, location: str, mega_aot: MegaAot, model_info_seed: str,
              identity: Optional[Dict[str, Any]]) -> CompileCache:
    os.makedirs(path, exist_ok=True)
    aside = _check_manifest(path, identity) if identity is not None else None
    try:
        seeded = seed_model_info(path, model_info_seed)
    except OSError as exc:  # vLLM then inspects the model class itself, 20 s later
        log.warning("compile cache: could not copy vLLM's model info from %s into %s: %s", model_info_seed, path, exc)
        seeded = ()
    if seeded:
        log.info("compile cache: vLLM's model info (%s) copied from the image's %s: vLLM need not inspect "
                 "the model class in a subprocess", ", ".join(seeded), model_info_seed)
    return CompileCache(path=path, location=location, before=count_artifacts(path), mega_aot=mega_aot,
                        model_info_seeded=seeded, identity=identity, model_info_seed_dir=model_info_seed,
                        set_aside=(aside,) if aside else ())


def read_cache_manifest(path: str) -> Optional[Dict[str, Any]]:
    """The manifest of a keyed folder; None when it has none, {} when it cannot be read."""
    try:
        with open(os.path.join(path, MANIFEST_NAME), encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def foreign_reason(written: Optional[Dict[str, Any]], identity: Dict[str, Any]) -> str:
    """Why a folder with manifest ``written`` is not this worker's (``identity``), in words."""
    if written is None:
        return "holds files but no manifest (written by another worker release, or by hand)"
    if not written:
        return "has a damaged manifest"
    return "was written for " + ", ".join(f"{name} {written.get(name)!r} (this worker: {value!r})"
                                          for name, value in identity.items() if written.get(name) != value)


def _check_manifest(path: str, identity: Dict[str, Any]) -> Optional[str]:
    """Make ``path`` a folder this worker wrote: a foreign one is set aside unread (its new place
    is returned), a new one gets the manifest."""
    written = read_cache_manifest(path)
    if written == identity:
        return None
    aside = None
    if any(name != MANIFEST_NAME and not name.startswith(PROBE_PREFIX) for name in os.listdir(path)):
        aside = set_aside(path, "foreign")
        log.warning("compile cache: %s %s: moved it to %s, unread; starting with an empty folder",
                    path, foreign_reason(written, identity), aside)
    manifest = os.path.join(path, MANIFEST_NAME)
    with open(manifest + f".{os.getpid()}.tmp", "w", encoding="utf-8") as handle:
        json.dump(identity, handle, indent=2, sort_keys=True)
    os.replace(manifest + f".{os.getpid()}.tmp", manifest)
    return aside


def set_aside(path: str, kind: str) -> str:
    """Move the folder ``path`` to a sibling named for ``kind`` ("foreign", "damaged") and make
    ``path`` anew, empty; returns the sibling. One such sibling of each kind is kept: older ones
    are deleted (on a network volume they would pile up)."""
    parent, name = os.path.split(os.path.normpath(path))
    for older in glob.glob(os.path.join(glob.escape(parent), f"{glob.escape(name)}.{kind}-*")):
        shutil.rmtree(older, ignore_errors=True)
    aside = os.path.join(parent, f"{name}.{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another worker moved it first
        pass
    os.makedirs(path, exist_ok=True)
    return aside


def _slug(text: str) -> str:
    text = text.strip("/").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._+@-]+", "-", text) or "-"
