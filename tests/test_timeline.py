"""The start-up timeline reads vLLM's own log lines for the engine's inner phases."""

from gams_worker.startup.timeline import StartupTimeline

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
