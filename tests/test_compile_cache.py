"""vLLM's compile cache: a keyed folder on the network volume or in the container, hit or miss."""

import json
import os
import subprocess
import sys
import time

import pytest

from gams_worker.startup import compile_cache
from gams_worker.startup.compile_cache import CompileCache, cache_key, choose_compile_cache
from gams_worker.config import load_config
from gams_worker.startup.host import GpuFacts, HostFacts
from tests.conftest import ROOT, engine_env, subprocess_env

H100 = GpuFacts(name="NVIDIA H100 80GB HBM3", compute_capability="9.0", total_bytes=None, free_bytes=None)
GPU_HOST = HostFacts(platform="cuda", gpus=(H100,), torch_version="2.11.0+cu130", vllm_version="0.25.0")
CPU_HOST = HostFacts(platform="cpu", torch_version="2.13.0+cpu", vllm_version="0.32.0+cpu")


def test_the_key_names_model_versions_and_gpu_readably():
    key = cache_key(load_config({"MODEL_NAME": "cjvt/GaMS-9B-Instruct"}), GPU_HOST)
    assert key == os.path.join("cjvt--GaMS-9B-Instruct", "vllm-0.25.0_torch-2.11.0+cu130",
                               "1xNVIDIA-H100-80GB-HBM3_sm9.0")
    keys = {
        key,
        cache_key(load_config({"MODEL_NAME": "cjvt/GaMS-9B-Instruct", "MODEL_REVISION": "v2"}), GPU_HOST),
        cache_key(load_config({"MODEL_NAME": "cjvt/GaMS-27B-Instruct"}), GPU_HOST),
        cache_key(load_config({"MODEL_NAME": "cjvt/GaMS-9B-Instruct"}), CPU_HOST),
    }
    assert len(keys) == 4


def test_network_volume_when_mounted_else_container(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "CONTAINER_DIR", str(tmp_path / "container"))
    volume = tmp_path / "runpod-volume"
    config = load_config({"MODEL_NAME": "cjvt/GaMS-9B-Instruct", "NETWORK_VOLUME_PATH": str(volume)})

    cache = choose_compile_cache(config, GPU_HOST)
    assert cache.location == "container"
    assert cache.path == str(tmp_path / "container" / cache_key(config, GPU_HOST))

    volume.mkdir()
    cache = choose_compile_cache(config, GPU_HOST)
    assert cache.location == "network volume"
    assert cache.path == str(volume / "gams-worker" / "compile-cache" / cache_key(config, GPU_HOST))
    assert os.path.isdir(cache.path) and cache.artifacts_before == 0
    assert cache.engine_environment() == {"VLLM_CACHE_ROOT": cache.path,
                                          "TRITON_CACHE_DIR": os.path.join(cache.path, "triton")}


def test_an_unusable_volume_falls_back_to_the_container(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "CONTAINER_DIR", str(tmp_path / "container"))
    volume = tmp_path / "runpod-volume"
    volume.mkdir()
    (volume / "gams-worker").write_text("a file where the cache folder should be")
    config = load_config({"NETWORK_VOLUME_PATH": str(volume)})
    assert choose_compile_cache(config, GPU_HOST).location == "container"


def test_explicit_folders_win(tmp_path):
    config = load_config({"COMPILE_CACHE_DIR": str(tmp_path / "cc"), "NETWORK_VOLUME_PATH": str(tmp_path)})
    cache = choose_compile_cache(config, CPU_HOST)
    assert (cache.location, cache.path) == ("COMPILE_CACHE_DIR", str(tmp_path / "cc" / cache_key(config, CPU_HOST)))
    config = load_config({"VLLM_CACHE_ROOT": str(tmp_path / "mine"), "COMPILE_CACHE_DIR": str(tmp_path / "cc")})
    assert choose_compile_cache(config, CPU_HOST).path == str(tmp_path / "mine")  # the user's, unkeyed


def test_hit_means_compiled_code_was_there_and_nothing_new_was_compiled(tmp_path):
    kernels = tmp_path / "torch_compile_cache" / "abc" / "inductor_cache" / "xy"
    empty = CompileCache(path=str(tmp_path), location="container", artifacts_before=0)
    kernels.mkdir(parents=True)
    (kernels / "kernel.so").write_bytes(b"\x7fELF")
    miss = empty.report("torch.compile took 20.1 s in total")
    assert (miss["hit"], miss["new_artifacts"]) == (False, 1)

    warm = CompileCache(path=str(tmp_path), location="container", artifacts_before=1)
    assert warm.report("")["hit"] is True
    (kernels / "another.so").write_bytes(b"\x7fELF")
    assert warm.report("")["hit"] is False  # it had to compile something
    loaded = warm.report("INFO [backends.py:292] Directly load the compiled graph(s) for compile range (1, 2048)")
    assert loaded["hit"] is True and loaded["vllm_loaded_graphs"] is True


def start_once(model_dir: str, cache_dir: str) -> dict:
    """`python handler.py` from process start to its first job; the job's start-up metadata."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps({"input": {"prompt": "Ljubljana", "sampling_params": {"max_tokens": 4}}})],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=subprocess_env(**engine_env(model_dir, COMPILE_CACHE_DIR=cache_dir)),
    )
    wall_s = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    final = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"choices"')][-1]
    startup = final["startup"]
    assert "compile cache" in result.stderr  # the log says hit or miss
    return {"wall_s": wall_s, **startup}


@pytest.mark.engine
def test_a_second_start_with_the_same_cache_hits_it_and_starts_faster(tiny_model_dir, tmp_path, record_property):
    first = start_once(tiny_model_dir, str(tmp_path))
    second = start_once(tiny_model_dir, str(tmp_path))
    first_cache, second_cache = first["compile_cache"], second["compile_cache"]
    assert first_cache["path"] == second_cache["path"]
    assert first_cache["path"].startswith(str(tmp_path))
    assert (first_cache["hit"], first_cache["artifacts_before"]) == (False, 0)
    assert first_cache["new_artifacts"] > 0
    assert second_cache["hit"] is True, second_cache
    # Reported, not asserted: timings on a shared CI machine are not a test.
    times = {name: {"engine_started_s": run["since_process_start_s"]["engine started"],
                    "first_job_s": run["since_process_start_s"]["first job served"],
                    "compiled_s": run["engine_phases_s"].get("compiled_s")}
             for name, run in (("cold", first), ("warm", second))}
    record_property("compile_cache_start_times", times)
    print(f"\ncompile cache, process start to first job: cold {times['cold']['first_job_s']:.1f} s, "
          f"warm {times['warm']['first_job_s']:.1f} s; engine started at {times['cold']['engine_started_s']:.1f} s "
          f"and {times['warm']['engine_started_s']:.1f} s")
