"""The worker's settings, read once from the environment into one typed object.

This is the only module that touches ``os.environ``: it reads it once, and
``export_to_engine`` adds what vLLM's engine process must read from its environment.
Every other module receives a ``WorkerConfig``. A bad value raises ``ConfigError``
with one line naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Optional, TypeVar

from gams_worker.errors import ConfigError
from gams_worker.presets import PRESETS
from gams_worker.versions import is_major_minor

T = TypeVar("T")

DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZATIONS = ("fp8",)
PREFETCH_POINTS = ("off", "with-imports", "after-imports")  # PREFETCH_WEIGHTS
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class InputLimits:
    max_input_bytes: int = 1_048_576
    max_prompt_chars: int = 200_000
    max_messages: int = 256
    max_stop_strings: int = 16
    max_stop_length: int = 256
    max_n: int = 16
    max_sequences: int = 16
    max_stop_token_ids: int = 16
    max_bad_words: int = 16
    max_logprobs: int = 20
    max_logit_bias: int = 300
    max_prompt_logprobs_tokens: int = 256
    max_grammar_bytes: int = 32_768
    max_schema_depth: int = 32
    grammar_compile_timeout_s: float = 10.0


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    # Model
    model_name: str = "cjvt/GaMS-9B-Instruct"
    model_revision: Optional[str] = None
    tokenizer_name: Optional[str] = None
    served_model_name: Optional[str] = None
    model_preset: Optional[str] = None  # a GaMS repo id (lower case) whose preset applies (default: MODEL_NAME's)
    trust_remote_code: bool = False
    # Engine
    max_model_len: int = 4096
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.90
    enforce_eager: bool = False
    graph_fallback: bool = True
    max_num_seqs: Optional[int] = None
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    quantization: Optional[str] = None  # "fp8": vLLM's online FP8 weights (compute capability >= 8.9)
    # Largest batch captured as a CUDA graph (README, "Fast starts"); None: vLLM's default (512).
    max_cudagraph_capture_size: Optional[int] = None
    # vLLM's per-iteration stats, and its stats line every 10 s as `vllm serve` logs it. Off: nothing
    # the worker reports reads them, and at 512 streams on an H200 they took ~4 % of its main process.
    log_engine_stats: bool = False
    # Jobs
    max_concurrency: Optional[int] = None  # None: sized from the KV cache (gams_worker/startup/concurrency.py)
    # Prompt + output tokens of a typical job, for that sizing: a chat turn or a translated paragraph
    # (vLLM pages the KV cache, so longer jobs still run; they queue only when most are long).
    expected_tokens_per_job: int = 512
    default_max_tokens: int = 512
    stream_batch_tokens: int = 16
    stream_batch_ms: int = 100
    # Stream POSTs a second over all streams, a budget the worker's event loop sustains beside the
    # engine's outputs (gams_worker/jobs/streaming.py; measured in BENCHMARKS.md, issue 23).
    stream_posts_per_second: int = 500
    # Input limits: each breach is a job error naming the field (see gams_worker/jobs/input.py)
    input_limits: InputLimits = InputLimits()
    # Opt-in status endpoint on 127.0.0.1 for tests and benchmarks (gams_worker/platform/status.py)
    status_port: Optional[int] = None
    # Where the model comes from (gams_worker/startup/model.py)
    baked_model_manifest: str = "/models/manifest.json"
    network_volume_path: str = "/runpod-volume"
    hf_hub_cache: str = os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")
    hub_offline: bool = False
    hf_endpoint: Optional[str] = None  # None: huggingface_hub's default (huggingface.co)
    # Where vLLM's compiled graphs are kept (gams_worker/startup/compile_cache.py): None picks the
    # network volume if mounted, else the container; VLLM_CACHE_ROOT, if set, wins unkeyed.
    compile_cache_dir: Optional[str] = None
    vllm_cache_root: Optional[str] = None
    # False keeps the compile cache in the container even with a volume mounted: what the cache
    # holds runs as code in the worker (README, "Trust boundary").
    compile_cache_on_volume: bool = True
    # vLLM's model info for the GaMS classes, computed when the image was built (builder/seed_model_info.py).
    model_info_seed_dir: str = "/opt/gams-worker/model-info"
    # The oldest CUDA the host's driver may support, as "13.0" (RUNPOD_MIN_CUDA_VERSION, which the
    # runpod SDK checks too, once the job loop starts): the doctor refuses older hosts before the engine.
    min_cuda_version: Optional[str] = None
    # vLLM's mega AOT artifact: compiled graphs saved and loaded as one piece (README, "Fast
    # starts"). None: on where the torch in use supports it (gams_worker/startup/compile_cache.py).
    mega_aot_artifact: Optional[bool] = None
    # When to read the weight files into the page cache in the background: "off", "with-imports" (while
    # Python imports torch and vLLM) or "after-imports" (gams_worker/startup/weight_prefetch.py).
    prefetch_weights: str = "off"
    # Liveness (gams_worker/startup/liveness.py), seconds; 0 turns a deadline off. The whole engine
    # start, every rung of the fallback ladder included, must end within ENGINE_START_TIMEOUT_S; with
    # requests in flight, the engine must produce output at least every ENGINE_STALL_TIMEOUT_S.
    engine_start_timeout_s: int = 1800
    engine_stall_timeout_s: int = 180
    # Test-only: make the first engine start fail inside the engine process with this text.
    inject_start_failure: Optional[str] = None
    log_level: str = "INFO"
    # Set by the platform: without a job URL the worker runs locally (test_input.json).
    on_runpod: bool = False
    # Names of the variables the environment set (presets fill only the others).
    explicit: frozenset = frozenset()

    @property
    def model_label(self) -> str:
        """The model name that users see in outputs."""
        return self.served_model_name or self.model_name


def load_config(environ: Optional[Mapping[str, str]] = None) -> WorkerConfig:
    """Build the config from ``environ`` (default: the process environment)."""
    env = _Env(os.environ if environ is None else environ)
    default = WorkerConfig()
    limits = default.input_limits
    return WorkerConfig(
        model_name=env.text("MODEL_NAME", default.model_name),
        model_revision=env.optional_text("MODEL_REVISION"),
        tokenizer_name=env.optional_text("TOKENIZER_NAME"),
        served_model_name=env.optional_text("SERVED_MODEL_NAME"),
        model_preset=env.optional_choice("MODEL_PRESET", tuple(PRESETS)),
        trust_remote_code=env.boolean("TRUST_REMOTE_CODE", default.trust_remote_code),
        max_model_len=env.integer("MAX_MODEL_LEN", default.max_model_len, minimum=16),
        dtype=env.choice("DTYPE", default.dtype, DTYPES),
        gpu_memory_utilization=env.fraction("GPU_MEMORY_UTILIZATION", default.gpu_memory_utilization),
        enforce_eager=env.boolean("ENFORCE_EAGER", default.enforce_eager),
        graph_fallback=env.boolean("GRAPH_FALLBACK", default.graph_fallback),
        max_num_seqs=env.optional_integer("MAX_NUM_SEQS", minimum=1),
        tensor_parallel_size=env.integer("TENSOR_PARALLEL_SIZE", default.tensor_parallel_size, minimum=1),
        enable_prefix_caching=env.boolean("ENABLE_PREFIX_CACHING", default.enable_prefix_caching),
        quantization=env.optional_choice("QUANTIZATION", QUANTIZATIONS),
        max_cudagraph_capture_size=env.optional_integer("MAX_CUDAGRAPH_CAPTURE_SIZE", minimum=1),
        log_engine_stats=env.boolean("LOG_ENGINE_STATS", default.log_engine_stats),
        max_concurrency=env.optional_integer("MAX_CONCURRENCY", minimum=1),
        expected_tokens_per_job=env.integer("EXPECTED_TOKENS_PER_JOB", default.expected_tokens_per_job, minimum=1),
        default_max_tokens=env.integer("DEFAULT_MAX_TOKENS", default.default_max_tokens, minimum=1),
        stream_batch_tokens=env.integer("STREAM_BATCH_TOKENS", default.stream_batch_tokens, minimum=1),
        stream_batch_ms=env.integer("STREAM_BATCH_MS", default.stream_batch_ms, minimum=0),
        stream_posts_per_second=env.integer("STREAM_POSTS_PER_SECOND", default.stream_posts_per_second, minimum=1),
        input_limits=InputLimits(
            max_input_bytes=env.integer("MAX_INPUT_BYTES", limits.max_input_bytes, minimum=1024),
            max_prompt_chars=env.integer("MAX_PROMPT_CHARS", limits.max_prompt_chars, minimum=1),
            max_messages=env.integer("MAX_MESSAGES", limits.max_messages, minimum=1),
            max_stop_strings=env.integer("MAX_STOP_STRINGS", limits.max_stop_strings, minimum=0),
            max_stop_length=env.integer("MAX_STOP_LENGTH", limits.max_stop_length, minimum=1),
            max_n=env.integer("MAX_N", limits.max_n, minimum=1),
            max_sequences=env.integer("MAX_SEQUENCES", limits.max_sequences, minimum=1),
            max_stop_token_ids=env.integer("MAX_STOP_TOKEN_IDS", limits.max_stop_token_ids, minimum=0),
            max_bad_words=env.integer("MAX_BAD_WORDS", limits.max_bad_words, minimum=0),
            max_logprobs=env.integer("MAX_LOGPROBS", limits.max_logprobs, minimum=0),
            max_logit_bias=env.integer("MAX_LOGIT_BIAS", limits.max_logit_bias, minimum=0),
            max_prompt_logprobs_tokens=env.integer("MAX_PROMPT_LOGPROBS_TOKENS", limits.max_prompt_logprobs_tokens,
                                                   minimum=0),
            max_grammar_bytes=env.integer("MAX_GRAMMAR_BYTES", limits.max_grammar_bytes, minimum=0),
            # vLLM 0.32 refuses schemas nested deeper than 64 levels itself.
            max_schema_depth=env.integer("MAX_SCHEMA_DEPTH", limits.max_schema_depth, minimum=1, maximum=64),
            grammar_compile_timeout_s=env.seconds("GRAMMAR_COMPILE_TIMEOUT_S", limits.grammar_compile_timeout_s),
        ),
        status_port=env.optional_integer("WORKER_STATUS_PORT", minimum=1, maximum=65535),
        baked_model_manifest=env.text("BAKED_MODEL_MANIFEST", default.baked_model_manifest),
        network_volume_path=env.text("NETWORK_VOLUME_PATH", default.network_volume_path),
        hf_hub_cache=_hf_hub_cache(env),
        hub_offline=env.boolean("HF_HUB_OFFLINE", default.hub_offline),
        hf_endpoint=env.optional_text("HF_ENDPOINT"),
        compile_cache_dir=env.optional_text("COMPILE_CACHE_DIR"),
        vllm_cache_root=env.optional_text("VLLM_CACHE_ROOT"),
        compile_cache_on_volume=env.boolean("COMPILE_CACHE_ON_VOLUME", default.compile_cache_on_volume),
        engine_start_timeout_s=env.integer("ENGINE_START_TIMEOUT_S", default.engine_start_timeout_s, minimum=0),
        engine_stall_timeout_s=env.integer("ENGINE_STALL_TIMEOUT_S", default.engine_stall_timeout_s, minimum=0),
        model_info_seed_dir=env.text("MODEL_INFO_SEED_DIR", default.model_info_seed_dir),
        min_cuda_version=env.version("RUNPOD_MIN_CUDA_VERSION"),
        # vLLM's own variable counts when ours is unset: a user who set it gets what they set.
        mega_aot_artifact=_first_given(env.optional_boolean("MEGA_AOT_ARTIFACT"),
                                       env.vllm_flag("VLLM_USE_MEGA_AOT_ARTIFACT")),
        prefetch_weights=env.choice("PREFETCH_WEIGHTS", default.prefetch_weights, PREFETCH_POINTS),
        inject_start_failure=env.optional_text("GAMS_TEST_INJECT_START_FAILURE"),
        log_level=env.choice("LOG_LEVEL", default.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True),
        on_runpod=env.optional_text("RUNPOD_WEBHOOK_GET_JOB") is not None
        or env.optional_text("RUNPOD_REALTIME_PORT") is not None,
        explicit=frozenset(env.given),
    )


def export_to_engine(variables: Mapping[str, str]) -> None:
    """Set variables for vLLM's engine process, which inherits this process's environment."""
    os.environ.update(variables)


def _first_given(*values: Optional[T]) -> Optional[T]:
    return next((value for value in values if value is not None), None)


def _hf_hub_cache(env: "_Env") -> str:
    """The Hugging Face cache folder, found as huggingface_hub finds it."""
    explicit = env.optional_text("HF_HUB_CACHE") or env.optional_text("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    xdg_cache = env.optional_text("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    hf_home = env.optional_text("HF_HOME") or os.path.join(xdg_cache, "huggingface")
    return os.path.join(os.path.expanduser(hf_home), "hub")


def _parse_boolean(raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError


class _Env:
    """Typed readers over one environment mapping; each raises ConfigError on a bad value."""

    def __init__(self, environ: Mapping[str, str]):
        self._environ = environ
        self.given: set = set()

    def _raw(self, name: str) -> Optional[str]:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        self.given.add(name)
        return value.strip()

    def _parse(self, name: str, default: T, parse: Callable[[str], T], allowed: str) -> T:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except ValueError:
            raise ConfigError(name, raw, allowed) from None

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def optional_text(self, name: str) -> Optional[str]:
        return self._raw(name)

    def version(self, name: str) -> Optional[str]:
        """A major.minor version such as "13.0", or None."""
        def parse(raw: str) -> str:
            if not is_major_minor(raw.strip()):
                raise ValueError
            return raw.strip()

        return self._parse(name, None, parse, "a version such as 13.0")

    def integer(self, name: str, default: int, minimum: int, maximum: Optional[int] = None) -> int:
        def parse(raw: str) -> int:
            value = int(raw)
            if value < minimum or (maximum is not None and value > maximum):
                raise ValueError
            return value

        allowed = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        return self._parse(name, default, parse, allowed)

    def optional_integer(self, name: str, minimum: int, maximum: Optional[int] = None) -> Optional[int]:
        return self.integer(name, None, minimum, maximum)  # type: ignore[arg-type]

    def seconds(self, name: str, default: float) -> float:
        """A duration in seconds, >= 0."""
        def parse(raw: str) -> float:
            value = float(raw)
            if not 0.0 <= value < float("inf"):
                raise ValueError
            return value

        return self._parse(name, default, parse, "a number of seconds >= 0")

    def fraction(self, name: str, default: float) -> float:
        def parse(raw: str) -> float:
            value = float(raw)
            if not 0.0 < value <= 1.0:
                raise ValueError
            return value

        return self._parse(name, default, parse, "a number in (0, 1]")

    def boolean(self, name: str, default: bool) -> bool:
        return self._parse(name, default, _parse_boolean, "true or false (also 1/0, yes/no, on/off)")

    def optional_boolean(self, name: str) -> Optional[bool]:
        """None when unset or "auto" (the worker decides)."""
        def parse(raw: str) -> Optional[bool]:
            if raw.lower() == "auto":
                return None
            return _parse_boolean(raw)

        return self._parse(name, None, parse, "true, false or auto (also 1/0, yes/no, on/off)")

    def vllm_flag(self, name: str) -> Optional[bool]:
        """A vLLM on/off variable, read as vLLM reads it: "1" is on, anything else off."""
        raw = self._raw(name)
        return None if raw is None else raw == "1"

    def optional_choice(self, name: str, choices: tuple) -> Optional[str]:
        return self.choice(name, None, choices)  # type: ignore[arg-type]

    def choice(self, name: str, default: str, choices: tuple, upper: bool = False) -> str:
        def parse(raw: str) -> str:
            value = raw.upper() if upper else raw.lower()
            if value not in choices:
                raise ValueError
            return value

        return self._parse(name, default, parse, "one of " + ", ".join(choices))
