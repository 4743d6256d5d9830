"""Settings are read once from the environment; bad values stop the worker with one line."""

import subprocess
import sys

import pytest

from gams_worker.config import WorkerConfig, configuration_table, load_config, settings, with_configuration_table
from gams_worker.errors import ConfigError
from tests.harness.worker_process import ROOT, subprocess_env


def test_defaults_serve_gams_9b():
    config = load_config({})
    assert config == WorkerConfig()
    assert config.model_name == "cjvt/GaMS-9B-Instruct"
    assert config.max_model_len == 4096
    assert config.dtype == "bfloat16"
    assert config.enforce_eager is False
    assert config.tokenizer_name is None  # the model's own (engine.py: the resolved model directory)
    assert config.on_runpod is False


def test_values_are_parsed_and_typed():
    config = load_config({
        "MODEL_NAME": "/models/gams", "TOKENIZER_NAME": "/tok", "MAX_MODEL_LEN": "8192",
        "GPU_MEMORY_UTILIZATION": "0.85", "ENFORCE_EAGER": "YES", "MAX_NUM_SEQS": "128",
        "TENSOR_PARALLEL_SIZE": "2", "ENABLE_PREFIX_CACHING": "off", "MAX_CONCURRENCY": "16",
        "STREAM_BATCH_TOKENS": "8", "STREAM_BATCH_MS": "0", "STREAM_POSTS_PER_SECOND": "250", "DTYPE": "Float16",
        "SERVED_MODEL_NAME": "gams", "RUNPOD_WEBHOOK_GET_JOB": "http://x/job-take",
    })
    assert (config.max_model_len, config.gpu_memory_utilization, config.max_num_seqs) == (8192, 0.85, 128)
    assert (config.enforce_eager, config.enable_prefix_caching) == (True, False)
    assert (config.tensor_parallel_size, config.max_concurrency) == (2, 16)
    assert (config.stream_batch_tokens, config.stream_batch_ms, config.dtype) == (8, 0, "float16")
    assert config.stream_posts_per_second == 250
    assert config.tokenizer_name == "/tok" and config.model_label == "gams" and config.on_runpod


def test_capture_size_limit_reaches_the_engine_except_in_eager_mode():
    from gams_worker.startup.engine import engine_kwargs

    config = load_config({"MAX_CUDAGRAPH_CAPTURE_SIZE": "64"})
    assert engine_kwargs(config, "full", "/m")["max_cudagraph_capture_size"] == 64
    assert engine_kwargs(config, "piecewise", "/m")["max_cudagraph_capture_size"] == 64
    assert "max_cudagraph_capture_size" not in engine_kwargs(config, "eager", "/m")
    assert "max_cudagraph_capture_size" not in engine_kwargs(load_config({}), "full", "/m")


def test_engine_stats_are_off_unless_asked_for_and_logged_every_interval_when_on():
    import asyncio

    from types import SimpleNamespace

    from gams_worker.jobs.dialects import JobDispatch
    from gams_worker.serving.stats_log import EngineStatsLog
    from gams_worker.startup.engine import engine_kwargs
    from gams_worker.worker import Worker

    assert engine_kwargs(load_config({}), "full", "/m")["disable_log_stats"] is True
    assert engine_kwargs(load_config({"LOG_ENGINE_STATS": "true"}), "full", "/m")["disable_log_stats"] is False

    class Engine:
        logged = 0

        async def do_log_stats(self):
            self.logged += 1

    class Plain:
        async def run(self, job):
            yield {"choices": []}

    engine = Engine()
    # The parts of a Worker that its run(job) uses, without an engine to build the rest.
    worker = SimpleNamespace(jobs=JobDispatch(Plain(), openai=None), stats_log=EngineStatsLog(engine, interval_s=0.05))

    async def scenario():
        for _ in range(3):  # the first job starts it, once
            assert [output async for output in Worker.run(worker, {"id": "j", "input": {}})] == [{"choices": []}]
        await asyncio.sleep(0.28)

    asyncio.run(scenario())
    assert 4 <= engine.logged <= 6


def test_compile_cache_settings():
    config = load_config({"COMPILE_CACHE_DIR": "/cache", "VLLM_CACHE_ROOT": "/vllm"})
    assert (config.compile_cache_dir, config.vllm_cache_root) == ("/cache", "/vllm")
    assert (load_config({}).compile_cache_dir, load_config({}).vllm_cache_root) == (None, None)


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("MAX_MODEL_LEN", "abc", "an integer >= 16"),
        ("MAX_MODEL_LEN", "8", "an integer >= 16"),
        ("GPU_MEMORY_UTILIZATION", "1.7", "a number in (0, 1]"),
        ("GPU_MEMORY_UTILIZATION", "0", "a number in (0, 1]"),
        ("ENFORCE_EAGER", "maybe", "true or false"),
        ("DTYPE", "int3", "one of auto, bfloat16, float16, float32"),
        ("MAX_NUM_SEQS", "-1", "an integer >= 1"),
        ("STREAM_BATCH_MS", "-5", "an integer >= 0"),
        ("MAX_CUDAGRAPH_CAPTURE_SIZE", "0", "an integer >= 1"),
    ],
)
def test_bad_value_names_variable_value_and_what_is_allowed(name, value, allowed):
    with pytest.raises(ConfigError) as info:
        load_config({name: value})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name}={value!r} is invalid: expected ")
    assert allowed in message


def test_no_other_module_reads_the_environment():
    offenders = []
    for path in (ROOT / "gams_worker").rglob("*.py"):
        text = path.read_text()
        if path.name != "config.py" and ("os.environ" in text or "getenv(" in text):
            offenders.append(path.name)
    assert offenders == []


@pytest.mark.parametrize("variable, value, expected", [
    ("MAX_MODEL_LEN", "abc", "an integer >= 16"),
    ("MODEL_PRESET", "cjvt/GaMS-1B", "one of cjvt/gams-2b-instruct, cjvt/gams-9b-instruct"),
])
def test_bad_env_stops_worker_at_start_with_one_line(variable, value, expected):
    result = subprocess.run(
        [sys.executable, "handler.py"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=subprocess_env(**{variable: value}),
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # no traceback, no noise
    assert lines[0].startswith(f"gams-worker: configuration error: {variable}={value!r} is invalid: expected {expected}")


def test_runpod_min_cuda_version_is_a_major_minor_version():
    assert load_config({"RUNPOD_MIN_CUDA_VERSION": "13.0"}).min_cuda_version == "13.0"
    assert load_config({}).min_cuda_version is None
    with pytest.raises(ConfigError, match="RUNPOD_MIN_CUDA_VERSION"):
        load_config({"RUNPOD_MIN_CUDA_VERSION": "thirteen"})


def test_the_configuration_table_is_the_generated_one():
    document = (ROOT / "CONFIGURATION.md").read_text(encoding="utf-8")
    assert with_configuration_table(document) == document, "the table is stale: python -m gams_worker.config --markdown"


def test_the_table_lists_every_variable_the_worker_reads_with_the_default_it_uses():
    asked = []

    class Recording(dict):  # the environment, noting every variable the worker reads
        def get(self, key, default=None):
            asked.append(key)
            return super().get(key, default)

    unset = load_config(Recording())
    listed = [name for _, setting in settings() for name in setting.variables]
    assert sorted(set(asked)) == sorted(listed) and len(listed) == len(set(listed))
    table = configuration_table()
    for field, setting in settings():
        holder = unset.input_limits if hasattr(unset.input_limits, field.name) else unset
        assert getattr(holder, field.name) == field.default, field.name  # what the table shows is what unset gives
        assert f"| {', '.join(f'`{name}`' for name in setting.variables)} |" in table
