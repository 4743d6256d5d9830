"""The start-up timeline: our steps and vLLM's phases, each second of a start in a named step."""

import subprocess
import sys
import time

from gams_worker.startup.timeline import WEIGHTS_LOADING, StartupTimeline
from tests.harness.worker_process import ROOT

# Lines as vLLM 0.25 logs them on an H100 (GaMS-9B-shaped), and as 0.32 does on CPU.
GPU_LOG = """
(VllmWorker pid=1) INFO [gpu_model_runner.py:2602] Model loading took 17.2209 GiB and 5.123456 seconds
(VllmWorker pid=1) INFO [backends.py:548] Directly load the compiled graph(s) for compile range (1, 8192) from the cache, took 4.012 s
(VllmWorker pid=1) INFO [monitor.py:34] torch.compile takes 4.01 s in total
(VllmWorker pid=1) INFO [gpu_model_runner.py:3480] Graph capturing finished in 9 secs, took 0.62 GiB
(EngineCore pid=2) INFO [core.py:210] init engine (profile, create kv cache, warmup model) took 18.41 seconds
"""
CPU_LOG = """
(Worker pid=3) INFO [default_loader.py:501] Loading weights took 0.00 seconds
(Worker pid=3) INFO [decorators.py:743] [backbone] saved AOT compiled function to /root/.cache/vllm/x/model
(Worker pid=3) INFO [monitor.py:91] torch.compile took 21.50 s in total
(EngineCore pid=4) INFO [core.py:402] init engine (profile, create kv cache, warmup model) took 26.94 s
"""
# A whole GPU start as it reaches the worker, line by line: (seconds since process start, line).
GPU_START = [
    (24.0, "(APIServer pid=9) INFO [model.py:619] Resolved architecture: Gemma2ForCausalLM"),
    (26.5, "(EngineCore_DP0 pid=10) INFO [core.py:115] Initializing a V1 LLM engine (v0.25.1) with config: ..."),
    (27.9, "(EngineCore_DP0 pid=10) INFO [gpu_model_runner.py:5210] Starting to load model /tmp/gams-9b-shaped..."),
    (32.1, "(EngineCore_DP0 pid=10) INFO [default_loader.py:431] Loading weights took 4.10 seconds"),
    (33.2, "(EngineCore_DP0 pid=10) INFO [gpu_model_runner.py:5307] Model loading took 17.22 GiB memory and 5.200000 seconds"),
    (33.9, "(EngineCore_DP0 pid=10) INFO [decorators.py:312] Directly load AOT compilation from path /v/x/model"),
    (34.4, "(EngineCore_DP0 pid=10) INFO [monitor.py:53] torch.compile takes 0.50 s in total"),
    (36.0, "(EngineCore_DP0 pid=10) INFO [kv_cache_utils.py:2146] GPU KV cache size: 201,040 tokens"),
    (40.1, "(EngineCore_DP0 pid=10) INFO [gpu_model_runner.py:6708] Graph capturing finished in 4 secs, took 0.62 GiB"),
    (42.3, "(EngineCore_DP0 pid=10) INFO [core.py:345] init engine (profile, create kv cache, warmup model) took 14.10 s"),
]


def test_engine_phases_from_gpu_log():
    timeline = StartupTimeline(started_at=0.0)
    timeline.read_engine_output(GPU_LOG)
    assert timeline.engine_phases == {"weights_loaded_s": 5.123456, "compiled_s": 4.01, "graphs_captured_s": 9.0,
                                      "kv_allocated_and_warmed_s": 18.41}


def test_engine_phases_from_cpu_log():
    timeline = StartupTimeline(started_at=0.0)
    timeline.read_engine_output(CPU_LOG)
    assert timeline.engine_phases == {"weights_loaded_s": 0.0, "compiled_s": 21.5, "kv_allocated_and_warmed_s": 26.94}


def test_marks_count_from_process_start():
    timeline = StartupTimeline()
    first = timeline.mark("imports done, config loaded")
    second = timeline.mark("engine started")
    assert 0 <= first <= second
    out = timeline.to_output()
    assert list(out["since_process_start_s"]) == ["imports done, config loaded", "engine started"]


def test_vllm_phases_are_marked_when_their_lines_arrive_and_every_second_has_a_step():
    timeline = StartupTimeline(started_at=1000.0)
    timeline.mark("vLLM engine classes imported", at=1023.0)
    returned = [timeline.watch_engine_line(line, at=1000.0 + seconds) for seconds, line in GPU_START]
    timeline.mark("engine started", at=1042.5)
    timeline.stop_watching()
    assert timeline.watch_engine_line(GPU_START[3][1], at=1050.0) is None  # the engine is up: no more marks
    out = timeline.to_output()
    assert out["since_process_start_s"] == {
        "vLLM engine classes imported": 23.0,
        "vLLM: model config read": 24.0,
        "vLLM: engine process started": 26.5,
        "vLLM: weights loading": 27.9,
        "vLLM: weights loaded": 32.1,  # the first of the two lines that end the load
        "vLLM: compiled model loading": 33.9,
        "vLLM: torch.compile done": 34.4,
        "vLLM: KV cache sized": 36.0,
        "vLLM: CUDA graphs captured": 40.1,
        "vLLM: engine initialised": 42.3,
        "engine started": 42.5,
    }
    assert out["step_s"]["vLLM: weights loaded"] == 4.2 and out["step_s"]["engine started"] == 0.2
    assert abs(sum(out["step_s"].values()) - 42.5) < 1e-6
    assert returned[2] == WEIGHTS_LOADING and returned[4] is None  # each phase is marked once
    # vLLM's own durations: the runner's "Model loading took" wins over the loader's line that came first.
    assert out["engine_phases_s"] == {"weights_loaded_s": 5.2, "compiled_s": 0.5, "graphs_captured_s": 4.0,
                                      "kv_allocated_and_warmed_s": 14.1}


def test_a_second_engine_process_marks_its_phases_again():
    timeline = StartupTimeline(started_at=0.0)
    for seconds, line in GPU_START[1:4] + GPU_START[1:4]:  # a failed start, then the fallback's
        timeline.watch_engine_line(line, at=seconds)
    assert list(timeline.to_output()["since_process_start_s"]) == [
        "vLLM: engine process started", "vLLM: engine process started #2", "vLLM: weights loading",
        "vLLM: weights loading #2", "vLLM: weights loaded", "vLLM: weights loaded #2"]


def test_process_start_is_when_the_process_was_created():
    spawned = time.time()
    printed = subprocess.run([sys.executable, "-c", "import time; time.sleep(0.5); "
                              "from gams_worker.startup.timeline import process_start_time; print(process_start_time())"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert spawned - 0.05 <= float(printed) <= spawned + 0.45  # its creation, not when it asked (0.5 s later)
