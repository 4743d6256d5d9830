"""What a failed engine start means, from what it printed and raised: the fallback ladder's classifier.

A failed CUDA-graph capture retries one rung lower; a cause no graph mode fixes ends the start with a
remedy; damaged files in a warm compile cache retry once in the same mode with the folder set aside.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence, Tuple

RETRY_LOWER_RUNG = "retry_lower_rung"
RETRY_EMPTY_CACHE = "retry_empty_cache"  # same mode, the compile cache folder set aside
FATAL = "fatal"


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    decision: str  # RETRY_LOWER_RUNG, RETRY_EMPTY_CACHE or FATAL
    cause: str  # the classified cause, in plain words
    remedy: str  # what a user can do about it ("" when the ladder handles it)
    evidence: str  # the output line that identified the cause
    next_mode: Optional[str] = None  # for the retries: the rung to try next


# Where in start-up a failure happened, from the traceback's frames and vLLM's log lines.
_STAGE_MARKERS: Sequence[Tuple[str, "re.Pattern[str]"]] = (
    ("load", re.compile(r"in (load_model|load_weights|_load_weights|download_weights_from_hf)\b"
                        r"|Starting to load model|Loading (safetensors|weights)")),
    ("profile", re.compile(r"in (determine_available_memory|profile_run)\b|Memory profiling")),
    ("compile", re.compile(r"torch\._dynamo|torch\._inductor|Dynamo bytecode transform|Compiling a graph")),
    ("capture", re.compile(r"in (capture_model|_capture_cudagraphs|capture_graph|_warmup_and_capture)\b"
                           r"|Capturing CUDA graph|cudagraph capture|CUDA graph capture", re.IGNORECASE)),
)
_STAGE_WORDS = {"load": "loading weights", "profile": "profiling memory", "compile": "compiling the model"}
# The last "Capturing CUDA graphs (..., FULL|PIECEWISE)" progress line names the capture that broke.
_CAPTURE_PROGRESS = re.compile(r"Capturing CUDA graphs \(([^)]*?),\s*(FULL|PIECEWISE)\)")

_MODEL_NOT_FOUND = re.compile(
    r"HFValidationError|RepositoryNotFoundError|LocalEntryNotFoundError|GatedRepoError"
    r"|Invalid repository ID or local directory|is not a valid model identifier"
    r"|is not a local folder|does not appear to have a file named config\.json"
    r"|No such file or directory: '[^']*config\.json'|Repo id must use alphanumeric"
    r"|Cannot find any model weights"
)
_UNSUPPORTED_ARCHITECTURE = re.compile(
    r"Model architectures \[[^\]]*\] (are not supported|failed to be inspected)"
    r"|No model architectures are specified"
)
_KV_CACHE_TOO_SMALL = re.compile(
    r"larger than the available KV cache memory|No available memory for the cache blocks"
)
_BAD_CONFIG = re.compile(
    r"ValidationError: \d+ validation errors? for \w*Config|User-specified max_model_len"
)
_DRIVER_TOO_OLD = re.compile(
    r"NVIDIA driver on your system is too old|CUDA driver version is insufficient for CUDA runtime version"
    r"|cudaErrorInsufficientDriver|Found no NVIDIA driver|Failed to infer device type"
)
_UNSUPPORTED_PTX = re.compile(
    r"provided PTX was compiled with an unsupported toolchain|cudaErrorUnsupportedPtxVersion"
    r"|CUDA_ERROR_UNSUPPORTED_PTX_VERSION"
)
_STREAM_CAPTURE = re.compile(
    r"operation not permitted when stream is capturing|cudaErrorStreamCapture\w+"
    r"|operation failed due to a previous error during capture|capture sequence has been invalidated"
)
_OUT_OF_MEMORY = re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory|cudaErrorMemoryAllocation")
_COMPILE_FAILED = re.compile(r"BackendCompilerFailed|InductorError|torch\._dynamo\.exc\.\w+Error")
# How damaged compiled files break a start, read only when the cache was warm: a truncated kernel
# dies of SIGBUS (-7) or SIGSEGV (-11), never SIGKILL (-9, the OOM killer's); MAINTAINERS.md has the forms.
_DAMAGED_ARTIFACT = re.compile(
    r"died unexpectedly \(exit code: (?:-7|-11|None)\)|Failed core proc\(s\): \{[^}]*: -(?:7|11)\b"
    r"|\bBus error\b|SIGBUS|pickle data was truncated|UnpicklingError|EOFError: Ran out of input"
    r"|invalid ELF header|file too short|ELF load command"
)
_NEWER_DRIVER = ("deploy on hosts whose driver supports this image's CUDA version (RunPod: allowedCudaVersions) "
                 "or use the CUDA-12 image")
# Failures that no graph mode fixes, checked first (a capture may be in the log before them): (pattern, cause, remedy).
_NO_GRAPH_MODE_FIXES: Sequence[Tuple["re.Pattern[str]", str, str]] = (
    (_MODEL_NOT_FOUND, "model not found", "check MODEL_NAME (a Hugging Face repo id or a local directory with "
     "config.json) and MODEL_REVISION, and that the model is baked into the image or downloadable"),
    (_UNSUPPORTED_ARCHITECTURE, "unsupported model architecture",
     "serve a model whose architecture this vLLM supports (GaMS is Gemma2ForCausalLM)"),
    (_DRIVER_TOO_OLD, "the GPU driver is missing or too old for this image's CUDA runtime", _NEWER_DRIVER),
    (_KV_CACHE_TOO_SMALL, "not enough GPU memory left for the KV cache of MAX_MODEL_LEN tokens",
     "lower MAX_MODEL_LEN, raise GPU_MEMORY_UTILIZATION, use a larger GPU or TENSOR_PARALLEL_SIZE=2"),
    (_BAD_CONFIG, "invalid engine configuration", "fix the setting named in the evidence"),
)


def classify_start_failure(text: str, failed_mode: str, warm_cache: Optional[str] = None) -> Diagnosis:
    """``warm_cache``: the compile cache folder, when it held compiled files before this attempt."""
    lines = text.replace("\r", "\n").splitlines()
    stage = _failure_stage(lines)
    return (_no_graph_mode_fixes(text, lines, stage) or _damaged_cache(lines, warm_cache, failed_mode)
            or _lower_rung(text, lines, stage, failed_mode))


def _no_graph_mode_fixes(text: str, lines: Sequence[str], stage: Optional[str]) -> Optional[Diagnosis]:
    for pattern, cause, remedy in _NO_GRAPH_MODE_FIXES:
        if pattern.search(text):
            return Diagnosis(FATAL, cause, remedy, _evidence(lines, pattern))
    if _OUT_OF_MEMORY.search(text) and stage != "capture":
        return Diagnosis(FATAL, f"out of GPU memory while {_STAGE_WORDS.get(stage, 'starting the engine')}",
                         "use a GPU with more memory, a quantized model or TENSOR_PARALLEL_SIZE=2; lowering "
                         "MAX_MODEL_LEN or GPU_MEMORY_UTILIZATION does not shrink the weights",
                         _evidence(lines, _OUT_OF_MEMORY))
    return None


def _damaged_cache(lines: Sequence[str], warm_cache: Optional[str], failed_mode: str) -> Optional[Diagnosis]:
    """A retry with the cache set aside where its files broke the start: a damaged artifact's error, or an
    error or traceback frame naming a file in ``warm_cache``."""
    if not warm_cache:
        return None
    evidence = _evidence(lines, _DAMAGED_ARTIFACT)
    if not evidence:
        folder = warm_cache.rstrip("/") + "/"
        naming = [line for line in lines if folder in line and (_EXCEPTION_LINE.search(line) or 'File "' in line)]
        evidence = _short(naming[-1]) if naming else ""
    if not evidence:
        return None
    return Diagnosis(RETRY_EMPTY_CACHE, "the compile cache looks damaged", "", evidence, failed_mode)


def _lower_rung(text: str, lines: Sequence[str], stage: Optional[str], failed_mode: str) -> Diagnosis:
    """A retry one rung lower for a failed capture or compile; FATAL for anything else."""
    broken_capture = _broken_capture(lines)
    if _UNSUPPORTED_PTX.search(text):
        if stage == "load":
            return Diagnosis(FATAL, "unsupported PTX while loading the model (driver older than the CUDA toolkit)",
                             _NEWER_DRIVER, _evidence(lines, _UNSUPPORTED_PTX))
        cause = "unsupported PTX (driver older than the CUDA toolkit)"
        return _retry(failed_mode, broken_capture, cause, _evidence(lines, _UNSUPPORTED_PTX))
    if _STREAM_CAPTURE.search(text):
        return _retry(failed_mode, broken_capture, "CUDA stream-capture error",
                      _evidence(lines, _STREAM_CAPTURE))
    if _OUT_OF_MEMORY.search(text):  # stage == "capture"
        return _retry(failed_mode, broken_capture, "out of GPU memory during capture",
                      _evidence(lines, _OUT_OF_MEMORY))
    if _COMPILE_FAILED.search(text):
        # PIECEWISE graphs are built by the same torch.compile pass; only eager avoids it.
        diagnosis = _retry(failed_mode, "PIECEWISE", "torch.compile failed", _evidence(lines, _COMPILE_FAILED))
        return dataclasses.replace(diagnosis, cause="torch.compile failed; only eager skips compilation")
    if stage == "capture":
        return _retry(failed_mode, broken_capture, "unrecognised error during CUDA-graph capture",
                      _last_error_line(lines))
    return Diagnosis(FATAL, "engine start-up failed for a cause no graph mode is known to fix",
                     "read the evidence and the log above it", _last_error_line(lines))


def _retry(failed_mode: str, broken_capture: Optional[str], cause: str, evidence: str) -> Diagnosis:
    """Retry below ``failed_mode``; a broken PIECEWISE capture skips the piecewise rung."""
    if broken_capture == "PIECEWISE" or failed_mode == "piecewise":
        next_mode: Optional[str] = "eager"
    elif failed_mode == "full":
        next_mode = "piecewise"
    else:
        next_mode = None
    if next_mode is None:
        return Diagnosis(FATAL, f"{cause} in eager mode, the lowest rung", "read the evidence and the log "
                         "above it; this is not a graph-mode problem", evidence)
    graph = f"{broken_capture} " if broken_capture else ""
    return Diagnosis(RETRY_LOWER_RUNG, f"{graph}CUDA-graph capture failed: {cause}", "", evidence, next_mode)


def _failure_stage(lines: Sequence[str]) -> Optional[str]:
    stage = None
    for line in lines:
        for name, pattern in _STAGE_MARKERS:
            if pattern.search(line):
                stage = name
    return stage


def _broken_capture(lines: Sequence[str]) -> Optional[str]:
    """FULL or PIECEWISE: the last CUDA-graph capture the output shows started."""
    for line in reversed(lines):
        match = _CAPTURE_PROGRESS.search(line)
        if match:
            return match.group(2)
    return None


_EXCEPTION_LINE = re.compile(r"\b\w+(Error|Exception)\b: ")


def _evidence(lines: Sequence[str], pattern: "re.Pattern[str]") -> str:
    """The last line matching ``pattern``, preferring an exception line ("SomeError: ...")."""
    matching = [line for line in lines if pattern.search(line)]
    exceptions = [line for line in matching if _EXCEPTION_LINE.search(line)]
    chosen = exceptions or matching
    return _short(chosen[-1]) if chosen else ""


def _last_error_line(lines: Sequence[str]) -> str:
    """The last exception line that is not vLLM's "See root cause above", usually the root cause."""
    for line in reversed(lines):
        if _EXCEPTION_LINE.search(line) and "See root cause above" not in line:
            return _short(line)
    return _short(lines[-1]) if lines else ""


def _short(line: str, limit: int = 300) -> str:
    # vLLM prefixes child lines with "(EngineCore_DP0 pid=1) ERROR 01-01 00:00:00 [core.py:1] "
    line = re.sub(r"^\([\w ]+pid=\d+\)\s*", "", line.strip())
    line = re.sub(r"^(ERROR|WARNING|INFO) \d\d-\d\d [\d:.]+ \[[^\]]*\]\s*", "", line)
    return line[:limit]
