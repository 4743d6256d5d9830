"""Which files of a hub repo make a servable model, how to tell a copy is whole, and the bake manifest:
shared by the bake step (builder/download_model.py) and start-up, so both accept the same files. Standard
library only: the Dockerfile copies it alone into the bake stage, so code changes do not re-download."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional

# What vLLM and the tokenizer read; duplicates of the weights in other formats are left out.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
IGNORE_PATTERNS = ["original/*", "*.bin", "*.pth", "*.pt", "*.gguf", "*.onnx", "*.msgpack", "*.h5"]
SAFETENSORS_INDEX = "model.safetensors.index.json"
MANIFEST_FORMAT = 1
MANIFEST_NAME = "manifest.json"


@dataclasses.dataclass(frozen=True)
class BakedManifest:  # what the bake step wrote
    repo_id: str
    revision: str  # the revision asked for (branch, tag or commit)
    commit: str  # the commit it resolved to
    model_dir: str  # relative to the manifest's folder, so the image can be moved
    files: Dict[str, int]  # path in the repo -> size in bytes
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
    """Raises ValueError on a manifest this worker does not understand."""
    data = json.loads(path.read_text())
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"manifest format {data.get('format')!r}, expected {MANIFEST_FORMAT}")
    return BakedManifest(data["repo_id"], data["revision"], data["commit"], data["model_dir"],
                         {str(k): int(v) for k, v in data["files"].items()})


# Bytes per element of each safetensors dtype; another dtype is checked for its byte ranges, not its shape.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers
# Without an index, "model-00002-of-00004.safetensors" says four shards exist.
_NUMBERED_SHARD = re.compile(r"^(?P<stem>.+)-(?P<number>\d{5})-of-(?P<count>\d{5})\.safetensors$")
TOKENIZER_CONFIG = "tokenizer_config.json"
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # one of them, or *.tiktoken
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class DamagedFileError(ValueError):
    """A model file that exists but cannot be what it claims to be; the message says why, in one line."""


def safetensors_header(path: Path) -> Dict[str, Any]:
    """The tensors of a .safetensors file (name -> dtype, shape, data_offsets) once it is known whole: it ends
    exactly where its header's last tensor ends. Raises DamagedFileError, or OSError when unreadable."""
    size = path.stat().st_size
    if size < 8:
        raise DamagedFileError(f"{path.name} is truncated ({size} bytes)")
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > size - 8:
            raise DamagedFileError(f"{path.name} is truncated (header of {header_len} bytes, file of {size})")
        if header_len > MAX_HEADER_BYTES:
            raise DamagedFileError(f"{path.name} has a damaged header (it claims {header_len} bytes)")
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:  # not JSON, or not UTF-8
            raise DamagedFileError(f"{path.name} has a damaged header (not JSON)") from None
    if not isinstance(header, dict):
        raise DamagedFileError(f"{path.name} has a damaged header (not a JSON object)")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    end = 0
    for name, entry in tensors.items():
        problem = _tensor_entry_problem(entry)
        if problem:
            raise DamagedFileError(f"{path.name} has a damaged header: tensor {name!r} {problem}")
        end = max(end, entry["data_offsets"][1])
    expected = 8 + header_len + end
    if size != expected:
        raise DamagedFileError(f"{path.name} has {size} bytes, its header says {expected}")
    return tensors


def _tensor_entry_problem(entry: Any) -> Optional[str]:
    if not isinstance(entry, dict):
        return "is not an object"
    offsets, shape, dtype = entry.get("data_offsets"), entry.get("shape"), entry.get("dtype")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        return f"has data_offsets {offsets!r}"
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        return f"has shape {shape!r}"
    if not isinstance(dtype, str):
        return f"has dtype {dtype!r}"
    needed = math.prod(shape) * _DTYPE_BYTES[dtype] if dtype in _DTYPE_BYTES else None
    if needed is not None and offsets[1] - offsets[0] != needed:
        return f"spans {offsets[1] - offsets[0]} bytes, its shape {shape} of {dtype} needs {needed}"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def index_weight_map(model_dir: Path) -> Optional[Dict[str, str]]:
    """The safetensors index's tensor -> shard map; None without an index; DamagedFileError when damaged."""
    index = model_dir / SAFETENSORS_INDEX
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_bytes())
    except ValueError:
        raise DamagedFileError(f"{SAFETENSORS_INDEX} is damaged (not JSON)") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise DamagedFileError(f"{SAFETENSORS_INDEX} is damaged (no weight_map)")
    if not all(isinstance(shard, str) and shard.endswith(".safetensors") and "/" not in shard
               for shard in weight_map.values()):
        raise DamagedFileError(f"{SAFETENSORS_INDEX} is damaged (its weight_map names files that are not shards)")
    return weight_map


def weight_shards(model_dir: Path, weight_map: Optional[Dict[str, str]]) -> List[str]:
    """The weight files vLLM loads: those the safetensors index names, else all *.safetensors."""
    if weight_map is not None:
        return sorted(set(weight_map.values()))
    return sorted(p.name for p in model_dir.glob("*.safetensors"))


def missing_numbered_shards(names: List[str]) -> List[str]:
    """Shards the "-of-N" naming of ``names`` says exist but are not among them."""
    present = set(names)
    missing = []
    for name in names:
        match = _NUMBERED_SHARD.match(name)
        if match:
            stem, width, count = match.group("stem"), len(match.group("count")), int(match.group("count"))
            missing += [shard for number in range(1, count + 1)
                        if (shard := f"{stem}-{number:0{width}d}-of-{count:0{width}d}.safetensors") not in present]
    return sorted(set(missing))


def find_problems(model_dir: Path, expected_sizes: Optional[Dict[str, int]] = None, *,
                  tokenizer: bool = True, chat_template: bool = False) -> List[str]:
    """Everything missing or damaged in ``model_dir`` (MAINTAINERS.md, "The bake step and the model locator");
    an empty list means the copy is whole. Never raises: an unreadable file is one of the problems."""
    try:
        problems = _find_problems(model_dir, expected_sizes or {}, tokenizer, chat_template)
    except OSError as exc:  # the folder itself cannot be listed or read
        problems = [f"{model_dir} cannot be read ({exc.strerror or exc})"]
    return sorted(set(problems))


def _find_problems(model_dir: Path, expected_sizes: Dict[str, int], tokenizer: bool,
                   chat_template: bool) -> List[str]:
    problems: List[str] = [f"{entry.name} is a broken link (its file is missing)"
                           for entry in model_dir.iterdir() if entry.is_symlink() and not entry.exists()]
    for name in ("config.json",) + ((TOKENIZER_CONFIG,) if tokenizer else ()):
        problem = _json_file_problem(model_dir / name)
        if problem:
            problems.append(problem)
    try:
        weight_map = index_weight_map(model_dir)
    except DamagedFileError as exc:
        return problems + [str(exc)]  # which shards the copy needs is unknown
    except OSError as exc:
        return problems + [f"{SAFETENSORS_INDEX} cannot be read ({exc.strerror or exc})"]
    shards = weight_shards(model_dir, weight_map)
    if not shards:
        problems.append("no .safetensors weights")
    if weight_map is None:
        problems += [f"shard {name} is missing (the -of-N naming of the shards present says it exists)"
                     for name in missing_numbered_shards(shards)]
    problems += [problem for shard in shards if (problem := _shard_problem(model_dir / shard, weight_map))]
    if tokenizer and not any((model_dir / name).is_file() for name in VOCABULARY_FILES) \
            and not any(model_dir.glob("*.tiktoken")):
        problems.append(f"no tokenizer vocabulary ({', '.join(VOCABULARY_FILES)} or *.tiktoken)")
    if chat_template and not _has_chat_template(model_dir):
        problems.append(f"no chat template ({' or '.join(CHAT_TEMPLATE_FILES)}, or a chat_template in "
                        f"{TOKENIZER_CONFIG}), which a chat model's copy has")
    for name, size in sorted(expected_sizes.items()):
        path = model_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, expected {size}")
    return problems


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_problems(adapter_dir: Path) -> List[str]:
    """Everything missing or damaged in a PEFT LoRA adapter's folder; empty: whole. Never raises."""
    if not adapter_dir.is_dir():
        return [f"{adapter_dir} is not a folder"]
    problems = [problem for problem in (_json_file_problem(adapter_dir / ADAPTER_CONFIG),) if problem]
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        return problems + [f"{ADAPTER_WEIGHTS} is missing (the worker serves safetensors adapters only)"]
    try:
        safetensors_header(weights)
    except DamagedFileError as exc:
        problems.append(str(exc))
    except OSError as exc:
        problems.append(f"{ADAPTER_WEIGHTS} cannot be read ({exc.strerror or exc})")
    return problems


def _shard_problem(path: Path, weight_map: Optional[Dict[str, str]]) -> Optional[str]:
    """What is wrong with one weight file: missing, damaged, or lacking tensors the index places in it."""
    if not path.is_file():  # a broken link is reported apart
        return None if path.is_symlink() else f"shard {path.name} (named in {SAFETENSORS_INDEX}) is missing"
    try:
        tensors = safetensors_header(path)
    except DamagedFileError as exc:
        return str(exc)
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror or exc})"
    absent = sorted(t for t, s in (weight_map or {}).items() if s == path.name and t not in tensors)
    if absent:
        return f"{path.name} lacks {len(absent)} of the tensors {SAFETENSORS_INDEX} places in it (first: {absent[0]})"
    return None


def _json_file_problem(path: Path) -> Optional[str]:
    if not path.is_file():
        return None if path.is_symlink() else f"{path.name} is missing"  # a broken link is reported apart
    try:
        data = json.loads(path.read_bytes())
    except ValueError:
        return f"{path.name} is damaged (not JSON)"
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror or exc})"
    return None if isinstance(data, dict) else f"{path.name} is damaged (not a JSON object)"


def _has_chat_template(model_dir: Path) -> bool:
    if any((model_dir / name).is_file() and (model_dir / name).stat().st_size > 0 for name in CHAT_TEMPLATE_FILES):
        return True
    try:
        config = json.loads((model_dir / TOKENIZER_CONFIG).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))
