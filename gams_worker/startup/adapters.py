"""The LoRA adapters LORA_MODULES names, read by vLLM's own ``--lora-modules`` parser, found by the model locator
and checked before the engine starts: whole, made for this base model (its name and its layers' shapes), of a
rank within MAX_LORA_RANK, targeting only layers vLLM serves with LoRA on Gemma 2, and with no feature vLLM
refuses. A refusal is one AdapterError line naming the adapter."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from gams_worker.config import WorkerConfig
from gams_worker.errors import AdapterError, ConfigError, IncompleteModelError, ModelNotFoundError
from gams_worker.memory import lora_shapes_of
from gams_worker.startup.model import resolve_adapter
from gams_worker.startup.model_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, safetensors_header

log = logging.getLogger(__name__)

GEMMA2 = ("Gemma2ForCausalLM",)  # the architectures whose LoRA layers the worker knows (memory.lora_shapes)
# A PEFT tensor of one layer's linear module: base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_TENSOR = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_HF_CACHE_FOLDER = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exits the process
        raise ValueError(message)


def parse_lora_modules(items: Tuple[str, ...]) -> List[Any]:
    """LORA_MODULES' items as vLLM's LoRAModulePath, read by ``vllm serve``'s own parser."""
    from vllm.entrypoints.launchers.cli_args import LoRAParserAction

    parser = _RaisingParser()
    parser.add_argument("--lora-modules", nargs="+", action=LoRAParserAction)
    try:
        modules = parser.parse_args(["--lora-modules", *items]).lora_modules
    except (ValueError, TypeError) as exc:
        raise ConfigError("LORA_MODULES", " ".join(items), f"adapters as vllm serve --lora-modules takes them "
                          f"({exc})") from None
    return modules


def locate_adapters(config: WorkerConfig, model_dir: str) -> Tuple[Any, ...]:
    """Each LORA_MODULES adapter as vLLM's LoRAModulePath, its path the checked local folder; AdapterError if one
    cannot be served."""
    if not config.lora_modules:
        return ()
    modules = parse_lora_modules(config.lora_modules)
    model_config = json.loads((Path(model_dir) / "config.json").read_text())
    base_names = _base_names(config, model_dir)
    seen: Set[str] = set()
    for module in modules:
        if module.name in seen or module.name in (config.model_label, config.model_name):
            raise AdapterError(module.name, "the name is taken (by another adapter or the model): each needs its own")
        seen.add(module.name)
        module.path = _adapter_folder(config, module)
        check_adapter(module.name, Path(module.path), base_names, model_config, config.max_lora_rank)
        log.info("LoRA adapter %s: %s", module.name, module.path)
    return tuple(modules)


def _adapter_folder(config: WorkerConfig, module: Any) -> str:
    try:
        return resolve_adapter(config, module.path).path
    except (ModelNotFoundError, IncompleteModelError) as exc:
        raise AdapterError(module.name, str(exc)) from None


def check_adapter(name: str, folder: Path, base_names: Set[str], model_config: Dict[str, Any], max_rank: int) -> None:
    """AdapterError where the adapter in ``folder`` cannot be served on the model of ``model_config``."""
    if not folder.is_dir():
        raise AdapterError(name, f"no adapter folder at {folder}")
    adapter_config = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = adapter_config.get("base_model_name_or_path")
    if base and not model_names(base) & base_names:
        raise AdapterError(name, f"made for {base}, not for this worker's model ({sorted(base_names)[0]})")
    ranks = [adapter_config.get("r")] + list((adapter_config.get("rank_pattern") or {}).values())
    if not all(isinstance(rank, int) and rank > 0 for rank in ranks):
        raise AdapterError(name, f"{ADAPTER_CONFIG} has no positive integer rank r")
    if max(ranks) > max_rank:
        raise AdapterError(name, f"rank {max(ranks)} is above MAX_LORA_RANK={max_rank}")
    _check_features(name, adapter_config, max_rank)
    if any(architecture in GEMMA2 for architecture in model_config.get("architectures") or ()):
        _check_tensors(name, safetensors_header(folder / ADAPTER_WEIGHTS), model_config)


def _check_features(name: str, adapter_config: Dict[str, Any], max_rank: int) -> None:
    """vLLM's own refusals of PEFT features it does not implement (DoRA, biases, ...)."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    try:
        PEFTHelper.from_dict(dict(adapter_config)).validate_legal(LoRAConfig(max_lora_rank=max_rank))
    except (ValueError, TypeError) as exc:
        raise AdapterError(name, str(exc).replace("\n", " ")) from None


def _check_tensors(name: str, tensors: Dict[str, Any], model_config: Dict[str, Any]) -> None:
    """Every tensor one of a Gemma 2 layer's q/k/v/o/gate/up/down, of the shape this model's layer needs."""
    text = model_config.get("text_config") or model_config
    shapes = lora_shapes_of(text)
    for tensor, entry in tensors.items():
        match = _TENSOR.match(tensor)
        if not match or match.group(2) not in shapes:
            raise AdapterError(name, f"targets {tensor}: vLLM serves LoRA on Gemma 2's {', '.join(shapes)} only")
        layer, module, part = int(match.group(1)), match.group(2), match.group(3)
        in_features, out_features = shapes[module]
        fits = entry["shape"][1] == in_features if part == "A" else entry["shape"][0] == out_features
        if layer >= text["num_hidden_layers"] or len(entry["shape"]) != 2 or not fits:
            raise AdapterError(name, f"{tensor} of shape {entry['shape']} does not fit this model's layer "
                               f"{layer} ({module}: {in_features} -> {out_features}): made for another model")


def model_names(name: Optional[str], *more: str) -> Set[str]:
    """The names a model goes by, to compare: as given, its last part (a repo id's name, a folder's), and the
    repo id of a Hugging Face cache's snapshot folder; lower case."""
    names: Set[str] = set()
    for each in (name, *more):
        if not each:
            continue
        text = each.strip().rstrip("/").lower()
        cached = _HF_CACHE_FOLDER.search(text + "/")
        if cached:
            names |= {f"{cached.group(1)}/{cached.group(2)}", cached.group(2)}
        names |= {text, text.rsplit("/", 1)[-1]}
    return names


def _base_names(config: WorkerConfig, model_dir: str) -> Set[str]:
    resolved = str(Path(model_dir).resolve()) if model_dir else ""
    return model_names(config.model_name, config.model_label, model_dir, resolved)
