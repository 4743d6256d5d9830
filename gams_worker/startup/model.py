"""The one model locator: where the model's (and each LoRA adapter's) files come from, in README's order
(local path, baked copy, RunPod's cache or the volume, the machine's Hugging Face cache, the hub). Only a
whole copy is used (model_files.find_problems); when none is, ModelNotFoundError names every place searched.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional

from gams_worker.config import WorkerConfig
from gams_worker.errors import IncompleteModelError, ModelNotFoundError
from gams_worker.startup.model_files import (
    ALLOW_PATTERNS, IGNORE_PATTERNS, adapter_problems, find_problems, read_manifest,
)
from gams_worker.presets import preset_for
from gams_worker.startup.volume import folder_problem

log = logging.getLogger(__name__)

LOCAL = "local directory"
BAKED = "baked copy"
RUNPOD_CACHE = "RunPod model cache / network volume"
MACHINE_CACHE = "Hugging Face cache"
HUB = "hub download"

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    path: str  # the local directory vLLM loads
    source: str  # one of LOCAL, BAKED, RUNPOD_CACHE, MACHINE_CACHE, HUB
    commit: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Wanted:
    """What the locator looks for: a repo id or path, its revision, and what keeps a folder from being whole."""

    name: str
    revision: Optional[str]
    problems: Callable[[Path, Optional[Dict[str, int]]], List[str]]
    baked: bool = True  # the image's baked copy may hold it (the model; adapters are never baked)


def _the_model(config: WorkerConfig) -> Wanted:
    return Wanted(config.model_name, config.model_revision,
                  lambda folder, sizes: copy_problems(config, folder, sizes))


def volume_cache_dir(config: WorkerConfig) -> Path:
    return Path(config.network_volume_path) / "huggingface-cache" / "hub"


def copy_problems(config: WorkerConfig, model_dir: Path, expected_sizes: Optional[Dict[str, int]] = None) -> List[str]:
    """What keeps ``model_dir`` from being a whole copy: the tokenizer unless TOKENIZER_NAME names another,
    the chat template for the GaMS chat models (every preset is one)."""
    return find_problems(model_dir, expected_sizes, tokenizer=config.tokenizer_name is None,
                         chat_template=preset_for(config.model_preset or config.model_name) is not None)


def resolve_model(config: WorkerConfig) -> ResolvedModel:
    return _resolve(config, _the_model(config))


def resolve_adapter(config: WorkerConfig, source: str) -> ResolvedModel:
    """A LoRA adapter's folder (adapter_config.json and whole adapter_model.safetensors), found as the model is."""
    return _resolve(config, Wanted(source, None, lambda folder, sizes: adapter_problems(folder), baked=False))


def _resolve(config: WorkerConfig, wanted: Wanted) -> ResolvedModel:
    searched: List[str] = []
    resolved = _find_local(config, wanted, searched) or _download(config, wanted, searched)
    log.info("model %s: using the %s at %s", wanted.name, resolved.source, resolved.path)
    return resolved


def find_local_model(config: WorkerConfig) -> Optional[ResolvedModel]:
    """The copy ``resolve_model`` would use if it is on this machine already; None if it would download."""
    return _find_local(config, _the_model(config), [])


def _find_local(config: WorkerConfig, wanted: Wanted, searched: List[str]) -> Optional[ResolvedModel]:
    name = wanted.name
    if Path(name).is_dir():
        problems = wanted.problems(Path(name), None)
        if problems:
            raise IncompleteModelError(name, problems)
        return ResolvedModel(str(Path(name).resolve()), LOCAL)
    if name.startswith(("/", "./", "../")):
        # A missing path: vLLM's start fails on it with a classified "model not found".
        return ResolvedModel(name, LOCAL)
    return ((_baked(config, searched) if wanted.baked else None)
            or _cached(wanted, RUNPOD_CACHE, volume_cache_dir(config), searched)
            or _cached(wanted, MACHINE_CACHE, Path(config.hf_hub_cache), searched))


def _baked(config: WorkerConfig, searched: List[str]) -> Optional[ResolvedModel]:
    manifest_path = Path(config.baked_model_manifest)
    where = f"baked manifest {manifest_path}"
    if not manifest_path.is_file():
        searched.append(f"{where}: absent")
        return None
    try:
        manifest = read_manifest(manifest_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        searched.append(f"{where}: unreadable ({exc})")
        return None
    if not manifest.matches(config.model_name, config.model_revision):
        searched.append(f"{where}: holds {manifest.repo_id}@{manifest.revision} ({manifest.commit}), "
                        f"not {config.model_name}@{config.model_revision or 'any revision'}")
        return None
    model_dir = manifest.model_path(manifest_path)
    problems = copy_problems(config, model_dir, manifest.files)
    if problems:
        searched.append(f"baked copy {model_dir}: incomplete ({'; '.join(problems)})")
        return None
    return ResolvedModel(str(model_dir), BAKED, manifest.commit)


def cached_snapshot(repo_id: str, revision: Optional[str], cache_dir: Path) -> Optional[Path]:
    """The snapshot of ``repo_id`` at ``revision`` in a Hugging Face cache; without a revision, the one
    ``main`` points to or the only one there (RunPod's model cache may hold one without refs)."""
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text().strip()
    elif revision and _COMMIT.match(revision):
        commit = revision
    elif revision is None and len(list(snapshots.iterdir())) == 1:
        commit = next(snapshots.iterdir()).name
    else:
        return None
    path = snapshots / commit
    return path if path.is_dir() else None


def _cached(wanted: Wanted, source: str, cache_dir: Path, searched: List[str]) -> Optional[ResolvedModel]:
    repo_id, revision = wanted.name, wanted.revision
    where = f"{source} {cache_dir}"
    try:
        path = cached_snapshot(repo_id, revision, cache_dir)
    except (OSError, UnicodeDecodeError) as exc:  # a damaged volume: its refs or folders unreadable
        searched.append(f"{where}: unreadable ({exc})")
        return None
    if path is None:
        searched.append(f"{where}: no snapshot of {repo_id}@{revision or 'main'}")
        return None
    problems = wanted.problems(path, None)
    if problems:
        searched.append(f"{where}: snapshot {path.name} incomplete ({'; '.join(problems)})")
        return None
    return ResolvedModel(str(path), source, path.name)


def _download(config: WorkerConfig, wanted: Wanted, searched: List[str]) -> ResolvedModel:
    if config.hub_offline:
        searched.append("the hub: not tried because HF_HUB_OFFLINE is set")
        raise ModelNotFoundError(wanted.name, searched)
    for cache_dir in _download_targets(config, searched):
        log.info("model %s: not found locally; downloading from the hub into %s", wanted.name, cache_dir)
        path = _fetch(config, wanted, cache_dir, searched)
        problems = wanted.problems(path, None)
        if not problems:
            return ResolvedModel(str(path), HUB, path.name)
        searched.append(f"the hub download into {cache_dir}: incomplete ({'; '.join(problems)})")
        log.warning("model %s: the download into %s is not whole (%s)", wanted.name, cache_dir,
                    "; ".join(problems))
    raise ModelNotFoundError(wanted.name, searched)


def _download_targets(config: WorkerConfig, searched: List[str]) -> List[Path]:
    """The volume's cache when a volume is mounted and writable, then the machine's cache."""
    machine = Path(config.hf_hub_cache)
    if not Path(config.network_volume_path).is_dir():
        return [machine]
    volume = volume_cache_dir(config)
    problem = folder_problem(str(volume))
    if problem:
        log.warning("model %s: cannot download into the network volume (%s); using %s instead",
                    config.model_name, problem, machine)
        searched.append(f"the volume's cache {volume} for the download: {problem}")
        return [machine]
    return [volume, machine]


def _fetch(config: WorkerConfig, wanted: Wanted, cache_dir: Path, searched: List[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(wanted.name, revision=wanted.revision, cache_dir=str(cache_dir),
                                      endpoint=config.hf_endpoint, allow_patterns=ALLOW_PATTERNS,
                                      ignore_patterns=IGNORE_PATTERNS))
    except Exception as exc:  # the hub client's errors differ by version; all mean "not fetched"
        searched.append(f"the hub: {type(exc).__name__}: {exc}")
        raise ModelNotFoundError(wanted.name, searched) from exc
