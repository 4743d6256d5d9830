"""ENGINE_ARGS: any other vLLM engine argument, as a JSON object, checked by vLLM's AsyncEngineArgs
before the engine starts; an argument the worker sets itself is refused, naming its setting."""

import dataclasses
import json
import subprocess
import sys

import pytest

from gams_worker.config import load_config
from gams_worker.errors import ConfigError
from gams_worker.startup.engine import WORKER_ARGUMENTS, capture_sizes, engine_kwargs, with_checked_engine_args
from tests.harness.worker_process import ROOT, engine_env, subprocess_env


def checked(engine_args: dict):
    return with_checked_engine_args(load_config({"ENGINE_ARGS": json.dumps(engine_args)}))


def test_unset_or_empty_passes_nothing():
    assert load_config({}).engine_args is None
    assert checked({}).engine_args is None
    assert engine_kwargs(checked({}), "full", "/m") == engine_kwargs(load_config({}), "full", "/m")


@pytest.mark.parametrize("raw", ['{"seed": 1', '["seed", 1]', '"fp8"'])
def test_anything_but_a_json_object_is_a_configuration_error(raw):
    with pytest.raises(ConfigError) as raised:
        load_config({"ENGINE_ARGS": raw})
    assert str(raised.value) == f"ENGINE_ARGS={raw!r} is invalid: expected a JSON object, as {{\"seed\": 1}}"


def test_arguments_reach_the_engine_as_vllms_types_beside_the_workers_own():
    config = checked({"kv_cache_dtype": "fp8", "max_num_batched_tokens": 8192, "seed": 7,
                      "attention_config": {"backend": "FLASH_ATTN"}})
    kwargs = engine_kwargs(config, "piecewise", "/m")
    assert (kwargs["kv_cache_dtype"], kwargs["max_num_batched_tokens"], kwargs["seed"]) == ("fp8", 8192, 7)
    assert type(kwargs["attention_config"]).__name__ == "AttentionConfig"  # as vLLM's own CLI makes it
    assert kwargs["max_model_len"] == 4096 and kwargs["compilation_config"] == {"cudagraph_mode": "PIECEWISE"}


@pytest.mark.parametrize("name, variable", [
    ("max_model_len", "MAX_MODEL_LEN"), ("gpu_memory_utilization", "GPU_MEMORY_UTILIZATION"),
    ("max_num_seqs", "MAX_NUM_SEQS"), ("model", "MODEL_NAME"),
])
def test_an_argument_the_worker_sets_is_refused_naming_its_setting(name, variable):
    with pytest.raises(ConfigError) as raised:
        checked({name: 1})
    assert str(raised.value) == (f"ENGINE_ARGS='{{\"{name}\": 1}}' is invalid: expected only arguments the "
                                 f"worker does not set: {name} is set by {WORKER_ARGUMENTS[name]}")
    assert variable in WORKER_ARGUMENTS[name]


def test_the_graph_mode_is_the_workers_and_other_compilation_fields_pass_through():
    with pytest.raises(ConfigError) as raised:
        checked({"compilation_config": {"cudagraph_mode": "FULL"}})
    assert str(raised.value).endswith("expected only fields the worker does not set: compilation_config."
                                      "cudagraph_mode is set by the graph mode (ENFORCE_EAGER, GRAPH_FALLBACK)")
    config = checked({"compilation_config": {"backend": "eager", "cudagraph_capture_sizes": [1, 8]}})
    assert engine_kwargs(config, "piecewise", "/m")["compilation_config"] == {
        "backend": "eager", "cudagraph_capture_sizes": [1, 8], "cudagraph_mode": "PIECEWISE"}
    assert engine_kwargs(config, "full", "/m")["compilation_config"] == {
        "backend": "eager", "cudagraph_capture_sizes": [1, 8]}
    eager = engine_kwargs(config, "eager", "/m")  # vLLM's enforce_eager: no graphs whatever it says
    assert eager["enforce_eager"] and eager["compilation_config"] == config.engine_args["compilation_config"]


def test_on_a_gpu_the_piecewise_rung_hashes_as_the_full_rung_to_reuse_its_compile_cache(monkeypatch):
    import copy
    import pickle

    from vllm.config import CompilationConfig

    from gams_worker.startup import engine

    monkeypatch.setattr(engine, "platform_name", lambda: "cuda")
    config = checked({"compilation_config": {"cudagraph_capture_sizes": [1, 8]}})
    rung = engine_kwargs(config, "piecewise", "/m")["compilation_config"]
    assert isinstance(rung, CompilationConfig) and rung.cudagraph_mode.name == "PIECEWISE"
    assert rung.cudagraph_capture_sizes == [1, 8]
    # What the FULL rung's config is once vLLM resolves its default mode: its compile cache's key.
    full = CompilationConfig(**engine_kwargs(config, "full", "/m")["compilation_config"],
                             cudagraph_mode="FULL_AND_PIECEWISE")
    assert rung.compute_hash() == full.compute_hash()
    assert CompilationConfig(cudagraph_mode="PIECEWISE", cudagraph_capture_sizes=[1, 8]).compute_hash() != \
        full.compute_hash()  # vLLM's own hash tells the modes apart
    for passed in (copy.deepcopy(rung), pickle.loads(pickle.dumps(rung))):  # as vLLM copies it, and spawns
        assert passed.cudagraph_mode.name == "PIECEWISE" and passed.compute_hash() == full.compute_hash()


def test_the_worker_captures_fewer_graph_sizes_unless_told_otherwise():
    sized = dataclasses.replace(load_config({}), max_num_seqs=320)
    sizes = engine_kwargs(sized, "full", "/m")["compilation_config"]["cudagraph_capture_sizes"]
    assert sizes == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]  # vLLM's default: 51
    assert all(later <= 2 * earlier for earlier, later in zip(sizes, sizes[1:]))
    assert capture_sizes(64)[-1] == 64 and capture_sizes(1) == [1]
    told = dataclasses.replace(sized, max_cudagraph_capture_size=64)
    assert engine_kwargs(told, "full", "/m")["max_cudagraph_capture_size"] == 64
    assert "compilation_config" not in engine_kwargs(told, "full", "/m")
    given = dataclasses.replace(checked({"compilation_config": {"cudagraph_capture_sizes": [4]}}), max_num_seqs=320)
    assert engine_kwargs(given, "full", "/m")["compilation_config"] == {"cudagraph_capture_sizes": [4]}


def test_an_unknown_name_is_refused_with_the_closest_argument():
    with pytest.raises(ConfigError) as raised:
        checked({"seed": 1, "max_batched_tokens": 8192})
    assert str(raised.value) == ("ENGINE_ARGS='{\"max_batched_tokens\": 8192}' is invalid: expected names of "
                                 "vLLM's AsyncEngineArgs (did you mean max_num_batched_tokens?)")


@pytest.mark.parametrize("name, value, expected", [
    ("max_num_batched_tokens", "lots", "max_num_batched_tokens: Input should be a valid integer"),
    ("kv_cache_dtype", "fp7", "kv_cache_dtype: Input should be 'auto', 'float16'"),
    ("attention_config", {"no_such_field": 1}, "attention_config.no_such_field: Unexpected keyword argument"),
])
def test_a_value_its_type_refuses_is_refused_naming_the_argument(name, value, expected):
    with pytest.raises(ConfigError) as raised:
        checked({name: value})
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"ENGINE_ARGS={json.dumps({name: value})!r} is invalid: expected {expected}")


def run_worker(model_dir: str, engine_args: dict, *args: str) -> subprocess.CompletedProcess:
    env = subprocess_env(**engine_env(model_dir, ENGINE_ARGS=json.dumps(engine_args)))
    return subprocess.run([sys.executable, "handler.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_bad_argument_stops_the_worker_before_the_engine_with_one_line(tiny_model_dir):
    result = run_worker(tiny_model_dir, {"max_batched_tokens": 8192})
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "gams-worker" in line or "Traceback" in line]
    assert lines == ["gams-worker: ENGINE_ARGS='{\"max_batched_tokens\": 8192}' is invalid: expected names "
                     "of vLLM's AsyncEngineArgs (did you mean max_num_batched_tokens?)"], result.stderr[-3000:]
    assert "starting vLLM engine" not in result.stderr


@pytest.mark.engine
def test_a_passed_argument_reaches_vllms_engine_config(tiny_model_dir):
    job = {"input": {"prompt": "Ljubljana je", "sampling_params": {"max_tokens": 4}}}
    result = run_worker(tiny_model_dir, {"seed": 4321}, "--test_input", json.dumps(job))
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr
    assert "and ENGINE_ARGS {'seed': 4321}" in log  # the worker's start line says where it came from
    engine_config = [line for line in log.splitlines() if "Initializing a V1 LLM engine" in line]
    assert engine_config and "seed=4321," in engine_config[0], log[-4000:]  # vLLM's own VllmConfig
