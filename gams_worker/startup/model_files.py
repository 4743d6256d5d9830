"""Which files of a hub repo make a servable model, how to tell a copy is whole, and the bake manifest.

Shared by the image's bake step (builder/download_model.py) and the worker's start-up
(gams_worker/startup/model.py), so both fetch and accept exactly the same files. This module
imports only the standard library: the Dockerfile copies it into the bake stage alone, so code
changes elsewhere do not re-download the weights.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Dict, List, Optional

# What vLLM and the tokenizer read: safetensors weights, configs, tokenizer files, the chat
# template. Everything else in a repo (.bin/.pth duplicates of the weights, GGUF, ONNX,
# original/ checkpoints) is left out.
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.jinja",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
]
IGNORE_PATTERNS = [
    "original/*",
    "*.bin",
    "*.pth",
    "*.pt",
    "*.gguf",
    "*.onnx",
    "*.msgpack",
    "*.h5",
]
SAFETENSORS_INDEX = "model.safetensors.index.json"
MANIFEST_FORMAT = 1
MANIFEST_NAME = "manifest.json"


@dataclasses.dataclass(frozen=True)
class BakedManifest:
    """What the bake step wrote: which repo and commit, and where the files lie.

    ``model_dir`` is stored relative to the manifest's folder so the image can be moved.
    ``files`` maps each file's path in the repo to its size in bytes.
    """

    repo_id: str
    revision: str  # the revision asked for (branch, tag or commit)
    commit: str  # the commit it resolved to
    model_dir: str
    files: Dict[str, int]
    format: int = MANIFEST_FORMAT

    def model_path(self, manifest_path: Path) -> Path:
        return (manifest_path.parent / self.model_dir).resolve()

    def matches(self, model_name: str, revision: Optional[str]) -> bool:
        if model_name != self.repo_id:
            return False
        return revision is None or revision in (self.revision, self.commit)


def write_manifest(path: Path, manifest: BakedManifest) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(manifest), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def read_manifest(path: Path) -> BakedManifest:
    """Read a manifest; raises ValueError when it is not one this worker understands."""
    data = json.loads(path.read_text())
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"manifest format {data.get('format')!r}, expected {MANIFEST_FORMAT}")
    return BakedManifest(
        repo_id=data["repo_id"],
        revision=data["revision"],
        commit=data["commit"],
        model_dir=data["model_dir"],
        files={str(k): int(v) for k, v in data["files"].items()},
    )


def safetensors_problem(path: Path) -> Optional[str]:
    """Why a .safetensors file is damaged (truncated, bad header), or None when it is whole.

    The format is an 8-byte little-endian header length, a JSON header whose tensors give
    their byte ranges, then the data: a whole file ends exactly where the last tensor ends.
    """
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is truncated ({size} bytes)"
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > size - 8:
            return f"{path.name} is truncated (header of {header_len} bytes, file of {size})"
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            return f"{path.name} has a damaged header"
    ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{path.name} has {size} bytes, its header says {expected}"
    return None


def weight_shards(model_dir: Path) -> List[str]:
    """The names of the weight files vLLM loads: those the safetensors index names, else all *.safetensors."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(p.name for p in model_dir.glob("*.safetensors"))


def find_problems(model_dir: Path, expected_sizes: Optional[Dict[str, int]] = None) -> List[str]:
    """Everything missing or damaged in ``model_dir``; an empty list means the copy is whole.

    Checks: config.json and weights present, every shard named in the safetensors index
    present, each safetensors file whole, and (when given) each file's size as expected.
    """
    problems: List[str] = []
    if not (model_dir / "config.json").is_file():
        problems.append("config.json is missing")
    shards = weight_shards(model_dir)
    if not shards:
        problems.append("no .safetensors weights")
    for shard in shards:
        shard_path = model_dir / shard
        if not shard_path.is_file():
            problems.append(f"shard {shard} (named in {SAFETENSORS_INDEX}) is missing")
            continue
        problem = safetensors_problem(shard_path)
        if problem:
            problems.append(problem)
    for name, size in sorted((expected_sizes or {}).items()):
        path = model_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, expected {size}")
    return sorted(set(problems))
