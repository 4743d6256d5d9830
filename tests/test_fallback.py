"""Unit tests of the start-failure classifier, the output capture and the fallback ladder.

The failure texts are shaped as vLLM prints them: the engine-core child's log lines
and traceback, then the parent's "Engine core initialization failed" traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gams_worker.config import WorkerConfig
from gams_worker.errors import EngineStartError
from gams_worker.startup.output_capture import OutputCapture
from gams_worker.startup.ladder import start_with_fallback
from gams_worker.startup.start_failure import FATAL, RETRY_EMPTY_CACHE, RETRY_LOWER_RUNG, classify_start_failure
from tests.harness.worker_process import wait_until

PARENT_TAIL = """\
Traceback (most recent call last):
  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/async_llm.py", line 183, in from_engine_args
  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/utils.py", line 1432, in wait_for_engine_startup
    raise RuntimeError(
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""

# The lines the issue reports from a RunPod host (the seed of this feature).
SEED = """\
INFO Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 51/51
INFO Capturing CUDA graphs (decode, FULL):   0%|          | 0/35
torch.AcceleratorError: CUDA error: the provided PTX was compiled with an unsupported toolchain.
Search for the following error message `cudaErrorUnsupportedPtxVersion'
ERROR EngineCore failed to start.
"""

_CHILD = "(EngineCore_DP0 pid=412) "


def child_log(*lines: str) -> str:
    return "".join(_CHILD + line + "\n" for line in lines)


CAPTURE_TRACEBACK = (
    "ERROR 11-26 10:00:01 [core.py:1510] EngineCore failed to start.",
    "ERROR 11-26 10:00:01 [core.py:1510] Traceback (most recent call last):",
    'ERROR 11-26 10:00:01 [core.py:1510]   File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", '
    "line 120, in __init__",
    'ERROR 11-26 10:00:01 [core.py:1510]   File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", '
    "line 260, in _initialize_kv_caches",
    'ERROR 11-26 10:00:01 [core.py:1510]   File "/usr/local/lib/python3.12/dist-packages/vllm/v1/worker/gpu_worker.py", '
    "line 588, in compile_or_warm_up_model",
    "ERROR 11-26 10:00:01 [core.py:1510]     cuda_graph_memory_bytes = self.model_runner.capture_model()",
    'ERROR 11-26 10:00:01 [core.py:1510]   File "/usr/local/lib/python3.12/dist-packages/vllm/v1/worker/'
    'gpu_model_runner.py", line 4410, in capture_model',
    'ERROR 11-26 10:00:01 [core.py:1510]   File "/usr/local/lib/python3.12/dist-packages/vllm/v1/worker/'
    'gpu_model_runner.py", line 4502, in _capture_cudagraphs',
)

STREAM_CAPTURE = child_log(
    "INFO 11-26 10:00:00 [gpu_model_runner.py:4380] Capturing CUDA graphs (decode, FULL):  12%| 4/35",
    *CAPTURE_TRACEBACK,
    "ERROR 11-26 10:00:01 [core.py:1510] RuntimeError: CUDA error: operation not permitted when stream is capturing",
    "ERROR 11-26 10:00:01 [core.py:1510] Search for `cudaErrorStreamCaptureUnsupported' in "
    "https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html for more information.",
) + PARENT_TAIL

OOM_DURING_CAPTURE = child_log(
    "INFO 11-26 10:00:00 [gpu_model_runner.py:4380] Capturing CUDA graphs (decode, FULL):  80%| 28/35",
    *CAPTURE_TRACEBACK,
    "ERROR 11-26 10:00:01 [core.py:1510] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 MiB. "
    "GPU 0 has a total capacity of 79.19 GiB of which 3.94 MiB is free.",
) + PARENT_TAIL

OOM_LOADING_WEIGHTS = child_log(
    "INFO 11-26 10:00:00 [gpu_model_runner.py:3120] Starting to load model cjvt/GaMS-9B-Instruct...",
    "ERROR 11-26 10:00:05 [core.py:1510] EngineCore failed to start.",
    "ERROR 11-26 10:00:05 [core.py:1510] Traceback (most recent call last):",
    'ERROR 11-26 10:00:05 [core.py:1510]   File "/usr/local/lib/python3.12/dist-packages/vllm/v1/worker/gpu_worker.py",'
    " line 290, in load_model",
    'ERROR 11-26 10:00:05 [core.py:1510]   File "/usr/local/lib/python3.12/dist-packages/vllm/model_executor/models/'
    'gemma2.py", line 410, in load_weights',
    "ERROR 11-26 10:00:05 [core.py:1510] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.75 GiB. "
    "GPU 0 has a total capacity of 15.57 GiB of which 1.02 GiB is free.",
) + PARENT_TAIL

# Printed by this vLLM for MODEL_NAME=/nonexistent (raised in the parent, before any child).
MISSING_MODEL = """\
Traceback (most recent call last):
  File "/work/main/.venv/lib/python3.11/site-packages/vllm/engine/arg_utils.py", line 914, in __post_init__
    self.model = get_model_path(self.model, self.revision)
  File "/work/main/.venv/lib/python3.11/site-packages/huggingface_hub/utils/_validators.py", line 139, in validate_repo_id
    raise HFValidationError(
huggingface_hub.errors.HFValidationError: Repo id must use alphanumeric chars, '-', '_' or '.'. The name cannot \
start or end with '-' or '.' and the maximum length is 96: '/nonexistent'.
"""

MISSING_MODEL_OFFLINE = """\
huggingface_hub.errors.LocalEntryNotFoundError: Cannot find an appropriate cached snapshot folder for the specified \
revision on the local disk and outgoing traffic has been disabled.
"""

KV_CACHE_TOO_SMALL = child_log(
    "ERROR 11-26 10:00:09 [core.py:1510] ValueError: To serve at least one request with the model's max seq len "
    "(8192), (2.63 GiB KV cache is needed, which is larger than the available KV cache memory (1.10 GiB).",
) + PARENT_TAIL

UNSUPPORTED_ARCHITECTURE = child_log(
    "ERROR 11-26 10:00:02 [core.py:1510] ValueError: Model architectures ['GammaForCausalLM'] are not supported "
    "for now. Supported architectures: dict_keys(['Gemma2ForCausalLM'])",
) + PARENT_TAIL

COMPILE_FAILED = child_log(
    *CAPTURE_TRACEBACK[:5],
    "ERROR 11-26 10:00:01 [core.py:1510] torch._dynamo.exc.BackendCompilerFailed: backend='<vllm.compilation."
    "backends.VllmBackend object>' raised: InductorError: CalledProcessError",
) + PARENT_TAIL

PIECEWISE_CAPTURE_BROKEN = SEED.replace(
    "INFO Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 51/51\n"
    "INFO Capturing CUDA graphs (decode, FULL):   0%|          | 0/35\n",
    "INFO Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):   2%|▏ | 1/51\n",
)


@pytest.mark.parametrize(
    "text, failed_mode, decision, next_mode, cause_words",
    [
        (SEED, "full", RETRY_LOWER_RUNG, "piecewise", "FULL CUDA-graph capture failed: unsupported PTX"),
        (SEED + PARENT_TAIL, "full", RETRY_LOWER_RUNG, "piecewise", "unsupported PTX"),
        (STREAM_CAPTURE, "full", RETRY_LOWER_RUNG, "piecewise", "stream-capture"),
        (OOM_DURING_CAPTURE, "full", RETRY_LOWER_RUNG, "piecewise", "out of GPU memory during capture"),
        (OOM_DURING_CAPTURE, "piecewise", RETRY_LOWER_RUNG, "eager", "out of GPU memory during capture"),
        (PIECEWISE_CAPTURE_BROKEN, "full", RETRY_LOWER_RUNG, "eager", "PIECEWISE CUDA-graph capture failed"),
        (COMPILE_FAILED, "full", RETRY_LOWER_RUNG, "eager", "torch.compile failed"),
        (OOM_LOADING_WEIGHTS, "full", FATAL, None, "out of GPU memory while loading weights"),
        (MISSING_MODEL, "full", FATAL, None, "model not found"),
        (MISSING_MODEL_OFFLINE, "full", FATAL, None, "model not found"),
        (KV_CACHE_TOO_SMALL, "full", FATAL, None, "KV cache"),
        (UNSUPPORTED_ARCHITECTURE, "full", FATAL, None, "unsupported model architecture"),
        (SEED, "eager", FATAL, None, "lowest rung"),
        (PARENT_TAIL, "full", FATAL, None, "no graph mode is known to fix"),
    ],
)
def test_classifier_maps_real_failure_texts_to_decisions(text, failed_mode, decision, next_mode, cause_words):
    diagnosis = classify_start_failure(text, failed_mode)
    assert diagnosis.decision == decision, diagnosis
    assert diagnosis.next_mode == next_mode, diagnosis
    assert cause_words in diagnosis.cause, diagnosis
    assert diagnosis.evidence, diagnosis
    if decision == FATAL:
        assert diagnosis.remedy, diagnosis


def test_evidence_is_the_root_cause_line_without_vllm_prefixes():
    assert classify_start_failure(SEED, "full").evidence == (
        "torch.AcceleratorError: CUDA error: the provided PTX was compiled with an unsupported toolchain.")
    evidence = classify_start_failure(OOM_LOADING_WEIGHTS, "full").evidence
    assert evidence.startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.75 GiB")
    # an unknown cause quotes the root-cause line, not vLLM's "See root cause above"
    unknown = classify_start_failure(child_log("ERROR [core.py:1] KeyError: 'rope_theta'") + PARENT_TAIL, "full")
    assert unknown.decision == FATAL and unknown.evidence == "ERROR [core.py:1] KeyError: 'rope_theta'"


def test_missing_model_is_fatal_even_with_a_capture_in_the_log():
    diagnosis = classify_start_failure(SEED + "OSError: Cannot find any model weights with `/models/gams`\n", "full")
    assert diagnosis.decision == FATAL
    assert diagnosis.cause == "model not found"


# --- output capture ----------------------------------------------------------------


def test_capture_sees_a_child_process_output_and_passes_it_through(capfd):
    capfd.readouterr()
    with OutputCapture() as capture:
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'child: cudaErrorUnsupportedPtxVersion\\n');"
                        "os.write(1, b'child stdout line\\n')"], check=True)
    text = capture.text()
    assert "child: cudaErrorUnsupportedPtxVersion" in text
    assert "child stdout line" in text
    passed = capfd.readouterr()
    assert "child: cudaErrorUnsupportedPtxVersion" in passed.err
    assert "child stdout line" in passed.out


def test_capture_keeps_only_the_last_bytes():
    with OutputCapture(limit_bytes=1000, fds=(2,)) as capture:
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'x' * 5000 + b'THE END')"], check=True)
    text = capture.text()
    assert len(text) == 1000
    assert text.endswith("THE END")


def test_capture_hands_out_whole_lines_with_their_arrival_time():
    lines = []
    before = time.time()
    with OutputCapture(fds=(2,), on_line=lambda line, at: lines.append((line, at))) as capture:
        subprocess.run([sys.executable, "-c", "import os, time; os.write(2, b'INFO weights load'); time.sleep(0.3);"
                        "os.write(2, b'ed\\nINFO graphs captured\\nno newline yet')"], check=True)
        # The tee thread hands lines out as it reads them: on a busy machine after the child ended.
        wait_until(lambda: len(lines) >= 2, 10, "the tee thread's two whole lines")
        capture.text()
    assert [line for line, _ in lines] == ["INFO weights loaded", "INFO graphs captured"]
    assert all(before + 0.3 <= at <= time.time() for _, at in lines)  # stamped when the line was whole


# --- the ladder --------------------------------------------------------------------


class FakeStarts:
    """start(mode) for the ladder: fails in the modes given, printing ``text`` from a child process."""

    def __init__(self, failures):
        self.failures = dict(failures)
        self.modes = []

    def __call__(self, mode):
        self.modes.append(mode)
        if mode in self.failures:
            # Like vLLM: the root cause comes from a child's stderr, the parent's error is generic.
            subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write(sys.argv[1])",
                            self.failures[mode]], check=True)
            raise RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
        return f"engine in {mode}"


def test_ladder_falls_back_from_full_to_piecewise_on_the_seed_failure(caplog):
    starts = FakeStarts({"full": SEED})
    started = start_with_fallback(WorkerConfig(), "full", "default", starts)
    assert starts.modes == ["full", "piecewise"]
    assert (started.engine, started.mode) == ("engine in piecewise", "piecewise")
    assert started.reason == ("FULL CUDA-graph capture failed: unsupported PTX (driver older than the CUDA "
                              "toolkit); fell back from full")
    assert "retrying at rung 2/3 in piecewise mode" in caplog.text


def test_ladder_goes_down_to_eager_when_piecewise_fails_too():
    starts = FakeStarts({"full": SEED, "piecewise": OOM_DURING_CAPTURE})
    started = start_with_fallback(WorkerConfig(), "full", "default", starts)
    assert starts.modes == ["full", "piecewise", "eager"]
    assert started.mode == "eager"
    assert "fell back from full and piecewise" in started.reason


def test_fatal_failure_stops_after_one_attempt():
    starts = FakeStarts({"full": OOM_LOADING_WEIGHTS})
    with pytest.raises(EngineStartError, match="out of GPU memory while loading weights") as raised:
        start_with_fallback(WorkerConfig(), "full", "default", starts)
    assert starts.modes == ["full"]
    assert "remedy:" in str(raised.value)
    assert isinstance(raised.value.__cause__, RuntimeError)
    # The error carries its diagnosis, not only a sentence.
    assert raised.value.cause == raised.value.diagnosis.cause == "out of GPU memory while loading weights"
    assert raised.value.diagnosis.decision == FATAL and "OutOfMemoryError" in raised.value.diagnosis.evidence


def test_graph_fallback_off_stops_after_one_attempt():
    starts = FakeStarts({"full": SEED})
    with pytest.raises(EngineStartError, match="GRAPH_FALLBACK=false"):
        start_with_fallback(WorkerConfig(graph_fallback=False), "full", "default", starts)
    assert starts.modes == ["full"]


def test_eager_start_has_no_lower_rung():
    starts = FakeStarts({"eager": SEED})
    with pytest.raises(EngineStartError, match="lowest rung"):
        start_with_fallback(WorkerConfig(), "eager", "ENFORCE_EAGER is set", starts)
    assert starts.modes == ["eager"]


# --- a damaged compile cache -----------------------------------------------------------

# What vLLM's CPU build printed when a compiled kernel (.so) in the warm cache was truncated
# (reproduced with the tiny model, MEGA_AOT_ARTIFACT=false): the process running the model died
# of SIGBUS while loading it, and vLLM's own error says only "cancelled".
TRUNCATED_KERNEL = "".join("(EngineCore pid=27060) " + line + "\n" for line in (
    "INFO 12-02 15:18:24 [cpu_model_runner.py:87] Warming up model for the compilation...",
    "ERROR 12-02 15:18:25 [multiproc_executor.py:315] Worker proc VllmWorker-0 died unexpectedly (exit code: -7), "
    "shutting down executor.",
    "ERROR 12-02 15:18:25 [core.py:1510] EngineCore failed to start.",
    "ERROR 12-02 15:18:25 [core.py:1510] Traceback (most recent call last):",
    'ERROR 12-02 15:18:25 [core.py:1510]   File "/venv/lib/python3.11/site-packages/vllm/distributed/'
    'device_communicators/shm_broadcast.py", line 867, in acquire_read',
    'ERROR 12-02 15:18:25 [core.py:1510]     raise RuntimeError("cancelled")',
    "ERROR 12-02 15:18:25 [core.py:1510] RuntimeError: cancelled",
)) + PARENT_TAIL


def test_a_truncated_kernel_in_a_warm_cache_is_a_damaged_cache_retried_in_the_same_mode():
    diagnosis = classify_start_failure(TRUNCATED_KERNEL, "full", warm_cache="/cache/key")
    assert (diagnosis.decision, diagnosis.next_mode) == (RETRY_EMPTY_CACHE, "full")
    assert diagnosis.cause == "the compile cache looks damaged"
    assert diagnosis.evidence.startswith("Worker proc VllmWorker-0 died unexpectedly (exit code: -7)")
    unreaped = TRUNCATED_KERNEL.replace("(exit code: -7)", "(exit code: None)")  # vLLM looked before the reaping
    assert classify_start_failure(unreaped, "full", warm_cache="/cache/key").decision == RETRY_EMPTY_CACHE
    # Without a warm cache the same death is what it was before: no cache to blame.
    assert classify_start_failure(TRUNCATED_KERNEL, "full").decision == FATAL
    # SIGKILL is the OOM killer's, not a damaged file's.
    killed = TRUNCATED_KERNEL.replace("(exit code: -7)", "(exit code: -9)")
    assert classify_start_failure(killed, "full", warm_cache="/cache/key").decision == FATAL
    # A load error naming a file in the folder (a truncated Inductor module) counts too.
    syntax = child_log(
        'ERROR [core.py:1510]   File "/cache/key/torch_compile_cache/inductor_cache/ab/cabc.py", line 40',
        "ERROR [core.py:1510] SyntaxError: unexpected EOF while parsing") + PARENT_TAIL
    assert classify_start_failure(syntax, "full", warm_cache="/cache/key").decision == RETRY_EMPTY_CACHE
    # Causes no cache explains stay what they are.
    assert classify_start_failure(MISSING_MODEL, "full", warm_cache="/cache/key").decision == FATAL
    assert classify_start_failure(SEED, "full", warm_cache="/cache/key").decision == RETRY_LOWER_RUNG


class SequencedStarts:
    """start(mode) for the ladder: the n-th attempt fails with ``texts[n]`` (None: it starts)."""

    def __init__(self, *texts):
        self.texts = list(texts)
        self.modes = []

    def __call__(self, mode):
        text = self.texts[len(self.modes)]
        self.modes.append(mode)
        if text is None:
            return f"engine in {mode}"
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write(sys.argv[1])", text], check=True)
        raise RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")


def warm_cache(tmp_path):
    from gams_worker.config import load_config
    from gams_worker.startup.compile_cache import choose_compile_cache

    config = load_config({"COMPILE_CACHE_DIR": str(tmp_path / "cc")})
    cold = choose_compile_cache(config)
    kernel = tmp_path / "cc" / cold.path / "torch_compile_cache" / "ab" / "kernel.so"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(b"\x7fELF truncated")
    return choose_compile_cache(config)


def test_a_damaged_cache_is_set_aside_and_the_start_retried_once_in_the_same_mode(tmp_path, caplog):
    cache = warm_cache(tmp_path)
    assert cache.before.compiled == 1
    starts = SequencedStarts(TRUNCATED_KERNEL, None)
    started = start_with_fallback(WorkerConfig(), "full", "default", starts, compile_cache=cache)
    assert starts.modes == ["full", "full"]  # no graph mode dropped
    assert (started.mode, started.reason) == ("full", "default")
    used = started.compile_cache
    assert used.path == cache.path and used.before.compiled == 0  # the retry read an empty folder
    (aside,) = used.set_aside
    assert aside.startswith(cache.path + ".damaged-")
    assert os.listdir(os.path.join(aside, "torch_compile_cache", "ab")) == ["kernel.so"]  # moved, unread
    assert "retrying in full mode with an empty folder" in caplog.text

    # Once per start: a second failure of the kind is classified as it would be without a cache.
    again = warm_cache(tmp_path / "again")
    twice = SequencedStarts(TRUNCATED_KERNEL, TRUNCATED_KERNEL)
    with pytest.raises(EngineStartError, match="no graph mode is known to fix"):
        start_with_fallback(WorkerConfig(), "full", "default", twice, compile_cache=again)
    assert twice.modes == ["full", "full"]


def test_a_start_past_its_deadline_is_not_retried():
    from gams_worker.startup.start_deadline import StartDeadline

    deadline = StartDeadline(0)  # no thread: the test says when it expired
    deadline.expired = True
    starts = SequencedStarts(SEED, None)
    with pytest.raises(EngineStartError, match="did not finish within ENGINE_START_TIMEOUT_S=0 s") as raised:
        start_with_fallback(WorkerConfig(), "full", "default", starts, deadline=deadline)
    assert starts.modes == ["full"] and raised.value.cause == "engine start timed out"
