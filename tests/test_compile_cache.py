"""vLLM's compile cache: its folder on the network volume or in the container, hit or miss."""

import json
import os
import subprocess
import sys
import time

import pytest

from gams_worker.startup import compile_cache
from gams_worker.startup.compile_cache import ArtifactCount, CompileCache, choose_compile_cache
from gams_worker.config import export_to_engine, load_config
from tests.harness.worker_process import ROOT, engine_env, subprocess_env

def test_network_volume_when_mounted_else_container(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "CONTAINER_DIR", str(tmp_path / "container"))
    volume = tmp_path / "runpod-volume"
    config = load_config({"MODEL_NAME": "cjvt/GaMS-9B-Instruct", "NETWORK_VOLUME_PATH": str(volume)})

    cache = choose_compile_cache(config)
    assert cache.location == "container"
    assert cache.path == str(tmp_path / "container")

    volume.mkdir()
    cache = choose_compile_cache(config)
    assert cache.location == "network volume"
    assert cache.path == str(volume / "gams-worker" / "compile-cache")
    assert os.path.isdir(cache.path) and cache.before == ArtifactCount(0, 0)
    assert cache.engine_environment() == {"VLLM_CACHE_ROOT": cache.path,
                                          "TRITON_CACHE_DIR": os.path.join(cache.path, "triton")}
    assert cache.engine_defaults() == {"VLLM_ENABLE_STARTUP_PLAN": "1"}  # vLLM's memory profile kept there too
    monkeypatch.delenv("VLLM_ENABLE_STARTUP_PLAN", raising=False)
    export_to_engine({}, cache.engine_defaults())
    assert os.environ["VLLM_ENABLE_STARTUP_PLAN"] == "1"
    monkeypatch.setenv("VLLM_ENABLE_STARTUP_PLAN", "0")  # vLLM's own variable: a deployment may turn it off
    export_to_engine({}, cache.engine_defaults())
    assert os.environ["VLLM_ENABLE_STARTUP_PLAN"] == "0"


def test_an_unusable_volume_falls_back_to_the_container(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "CONTAINER_DIR", str(tmp_path / "container"))
    volume = tmp_path / "runpod-volume"
    volume.mkdir()
    (volume / "gams-worker").write_text("a file where the cache folder should be")
    config = load_config({"NETWORK_VOLUME_PATH": str(volume)})
    assert choose_compile_cache(config).location == "container"


def test_explicit_folders_win(tmp_path):
    config = load_config({"COMPILE_CACHE_DIR": str(tmp_path / "cc"), "NETWORK_VOLUME_PATH": str(tmp_path)})
    cache = choose_compile_cache(config)
    assert (cache.location, cache.path) == ("COMPILE_CACHE_DIR", str(tmp_path / "cc"))
    config = load_config({"VLLM_CACHE_ROOT": str(tmp_path / "mine"), "COMPILE_CACHE_DIR": str(tmp_path / "cc")})
    assert choose_compile_cache(config).path == str(tmp_path / "mine")  # the user's


def test_hit_means_compiled_code_was_there_and_nothing_new_was_compiled(tmp_path):
    kernels = tmp_path / "torch_compile_cache" / "abc" / "inductor_cache" / "xy"
    empty = CompileCache(path=str(tmp_path), location="container", before=ArtifactCount(0, 0))
    kernels.mkdir(parents=True)
    (kernels / "kernel.so").write_bytes(b"\x7fELF")
    miss = empty.report("torch.compile took 20.1 s in total")
    assert (miss["hit"], miss["new_artifacts"]) == (False, 1)

    warm = CompileCache(path=str(tmp_path), location="container", before=ArtifactCount(1, 0))
    assert warm.report("")["hit"] is True
    (kernels / "another.so").write_bytes(b"\x7fELF")
    assert warm.report("")["hit"] is False  # it had to compile something
    loaded = warm.report("INFO [backends.py:292] Directly load the compiled graph(s) for compile range (1, 2048)")
    assert loaded["hit"] is True and loaded["vllm_loaded_graphs"] is True


def test_triton_kernels_are_counted_apart(tmp_path):
    triton = tmp_path / "triton" / "ABCDEF"
    triton.mkdir(parents=True)
    for name in ("kernel.cubin", "kernel.ptx", "kernel.json", "__grp__kernel.json"):
        (triton / name).write_text("x")
    graphs = tmp_path / "torch_compile_cache" / "abc"
    graphs.mkdir(parents=True)
    (graphs / "model").write_bytes(b"x")
    cache = choose_compile_cache(load_config({"VLLM_CACHE_ROOT": str(tmp_path)}))
    assert cache.before == ArtifactCount(compiled=5, triton=4)
    (triton.parent / "GHIJ").mkdir()
    (triton.parent / "GHIJ" / "kernel.cubin").write_text("x")
    report = cache.report("")
    assert (report["triton_kernel_files_before"], report["new_triton_kernel_files"]) == (4, 1)
    assert report["new_artifacts"] == 1 and report["hit"] is False


def test_a_new_folder_gets_the_model_info_it_lacks_from_the_seed(tmp_path):
    seed = tmp_path / "seed" / "modelinfos"
    seed.mkdir(parents=True)
    for name in ("gemma2.json", "gemma3.json"):
        (seed / name).write_text(f'{{"hash": "{name}"}}')
    config = load_config({"COMPILE_CACHE_DIR": str(tmp_path / "cache"), "MODEL_INFO_SEED_DIR": str(tmp_path / "seed")})
    first = choose_compile_cache(config)
    assert first.model_info_seeded == ("gemma2.json", "gemma3.json")
    assert (tmp_path / "cache").joinpath(first.path, "modelinfos", "gemma2.json").read_text() == '{"hash": "gemma2.json"}'
    assert first.before == ArtifactCount(0, 0)  # model facts, not compiled code: the folder is still cold
    own = os.path.join(first.path, "modelinfos", "gemma3.json")
    with open(own, "w") as handle:
        handle.write('{"hash": "written by vLLM"}')
    os.remove(os.path.join(first.path, "modelinfos", "gemma2.json"))
    again = choose_compile_cache(config)
    assert again.model_info_seeded == ("gemma2.json",)  # what vLLM wrote itself stays
    assert open(own).read() == '{"hash": "written by vLLM"}'
    assert again.report("")["model_info_seeded"] == ["gemma2.json"]
    no_seed = load_config({"COMPILE_CACHE_DIR": str(tmp_path / "other"), "MODEL_INFO_SEED_DIR": str(tmp_path / "none")})
    assert choose_compile_cache(no_seed).model_info_seeded == ()


def start_once(model_dir: str, cache_dir: str, model_info_seed: str) -> dict:
    """`python handler.py` from process start to its first job; the job's start-up metadata and the log."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps({"input": {"prompt": "Ljubljana", "sampling_params": {"max_tokens": 4}}})],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=subprocess_env(**engine_env(model_dir, COMPILE_CACHE_DIR=cache_dir,
                                         MODEL_INFO_SEED_DIR=model_info_seed)),
    )
    wall_s = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    final = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"choices"')][-1]
    startup = final["startup"]
    assert "compile cache" in result.stderr  # the log says hit or miss
    return {"wall_s": wall_s, **startup, "engine": final["engine"], "log": result.stderr}


@pytest.fixture(scope="module")
def two_starts(tiny_model_dir, tmp_path_factory):
    """A cold start and a warm one on one compile cache folder, with the image's model-info seed."""
    tmp_path = tmp_path_factory.mktemp("compile-cache")
    # The image's build step, run here: vLLM's model info for the GaMS classes, dated in the past.
    seed = tmp_path / "model-info"
    subprocess.run([sys.executable, "-m", "builder.seed_model_info", "--out", str(seed)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300, env=subprocess_env())
    seed_file = seed / "modelinfos" / "vllm-model_executor-models-gemma2-Gemma2ForCausalLM.json"
    os.utime(seed_file, (1e9, 1e9))
    cache_dir = str(tmp_path / "cache")
    first = start_once(tiny_model_dir, cache_dir, model_info_seed=str(seed))
    second = start_once(tiny_model_dir, cache_dir, model_info_seed=str(seed))
    return {"tmp_path": tmp_path, "seed": seed, "seed_file": seed_file, "cache_dir": cache_dir,
            "first": first, "second": second}


@pytest.mark.engine
def test_a_second_start_with_the_same_cache_hits_it_and_starts_faster(two_starts, record_property):
    tmp_path, seed_file = two_starts["tmp_path"], two_starts["seed_file"]
    first, second = two_starts["first"], two_starts["second"]
    first_cache, second_cache = first["compile_cache"], second["compile_cache"]
    # The new folder got the seed, and vLLM used it: on a miss it inspects the class in a
    # subprocess and writes the file anew (now-dated).
    assert seed_file.name in first_cache["model_info_seeded"] and second_cache["model_info_seeded"] == []
    assert os.stat(os.path.join(first_cache["path"], "modelinfos", seed_file.name)).st_mtime == 1e9
    assert first_cache["path"] == second_cache["path"]
    assert first_cache["path"].startswith(str(tmp_path))
    assert (first_cache["hit"], first_cache["artifacts_before"]) == (False, 0)
    assert first_cache["new_artifacts"] > 0
    assert second_cache["hit"] is True, second_cache
    for run in (first, second):  # every second of the start belongs to a named step
        marks, steps = run["since_process_start_s"], run["step_s"]
        for step in ("torch imported", "vLLM engine classes imported", "vLLM: engine process started",
                     "vLLM: weights loaded", "vLLM: engine initialised", "engine started", "runpod imported"):
            assert step in marks, (step, marks)
        assert abs(sum(steps.values()) - marks["first job served"]) < 0.01 * len(steps)
    # Reported, not asserted: timings on a shared CI machine are not a test.
    times = {name: {"engine_started_s": run["since_process_start_s"]["engine started"],
                    "first_job_s": run["since_process_start_s"]["first job served"],
                    "compiled_s": run["engine_phases_s"].get("compiled_s")}
             for name, run in (("cold", first), ("warm", second))}
    record_property("compile_cache_start_times", times)
    print(f"\ncompile cache, process start to first job: cold {times['cold']['first_job_s']:.1f} s, "
          f"warm {times['warm']['first_job_s']:.1f} s; engine started at {times['cold']['engine_started_s']:.1f} s "
          f"and {times['warm']['engine_started_s']:.1f} s")
    for name, run in (("cold", first), ("warm", second)):
        print(f"{name} start, seconds per step: {json.dumps(run['step_s'])}")


# --- damaged folders, and folders that cannot be written ------------------------------


def test_a_damaged_folder_is_emptied_and_keeps_its_model_info(tmp_path):
    seed = tmp_path / "seed" / "modelinfos"
    seed.mkdir(parents=True)
    (seed / "gemma2.json").write_text("{}")
    config = load_config({"COMPILE_CACHE_DIR": str(tmp_path / "cc"), "MODEL_INFO_SEED_DIR": str(tmp_path / "seed")})
    cache = choose_compile_cache(config)
    open(os.path.join(cache.path, "broken.so"), "wb").write(b"\x7f")
    cache = choose_compile_cache(config)
    emptied = cache.emptied()
    assert (emptied.path, emptied.before.compiled) == (cache.path, 0)
    assert sorted(os.listdir(emptied.path)) == ["modelinfos"]
    assert os.listdir(emptied.set_aside[0]) and "broken.so" in os.listdir(emptied.set_aside[0])
    assert choose_compile_cache(config).set_aside == ()


def test_vllm_tracing_its_graphs_again_after_a_load_failure_is_reported(tmp_path):
    warm = CompileCache(path=str(tmp_path), location="container", before=ArtifactCount(3, 0))
    output = ("WARNING [decorators.py:333] [backbone] Compiling model again due to a load failure from "
              "/c/rank_0_0/model, reason: pickle data was truncated")
    assert warm.report(output)["vllm_recompiled_after_load_failure"] is True
    assert warm.report("")["vllm_recompiled_after_load_failure"] is False


def test_compile_cache_on_volume_false_keeps_it_in_the_container(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "CONTAINER_DIR", str(tmp_path / "container"))
    (tmp_path / "volume").mkdir()
    config = load_config({"NETWORK_VOLUME_PATH": str(tmp_path / "volume"), "COMPILE_CACHE_ON_VOLUME": "false"})
    assert choose_compile_cache(config).location == "container"
    assert not (tmp_path / "volume" / "gams-worker").exists()


def volume_warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "compile cache" in r.getMessage()]


def test_a_read_only_volume_where_the_folder_exists_is_warned_about_and_the_container_used(tmp_path, monkeypatch,
                                                                                           caplog):
    from tests.harness.volumes import remount_read_only, tmpfs

    monkeypatch.setattr(compile_cache, "CONTAINER_DIR", str(tmp_path / "container"))
    volume = tmp_path / "volume"
    config = load_config({"NETWORK_VOLUME_PATH": str(volume)})
    with tmpfs(volume, 4 << 30):
        on_volume = choose_compile_cache(config)  # the folder exists
        assert on_volume.location == "network volume"
        remount_read_only(volume)  # os.makedirs(exist_ok=True) still passes on it
        caplog.clear()
        cache = choose_compile_cache(config)
    assert cache.location == "container" and cache.path.startswith(str(tmp_path / "container"))
    (warning,) = volume_warnings(caplog)
    assert warning.startswith(f"compile cache: cannot use the network volume folder: {on_volume.path} is not "
                              "writable (Read-only file system); keeping it in the container folder")


def test_a_full_or_nearly_full_volume_is_warned_about_and_the_container_used(tmp_path, monkeypatch, caplog):
    from tests.harness.volumes import fill, tmpfs

    monkeypatch.setattr(compile_cache, "CONTAINER_DIR", str(tmp_path / "container"))
    volume = tmp_path / "volume"
    config = load_config({"NETWORK_VOLUME_PATH": str(volume)})
    with tmpfs(volume, 16 << 20):  # writable, but under MIN_FREE_BYTES
        assert choose_compile_cache(config).location == "container"
        (warning,) = volume_warnings(caplog)
        assert "MiB free, less than the 1024 MiB it needs" in warning
        caplog.clear()
        monkeypatch.setattr(compile_cache, "MIN_FREE_BYTES", 0)
        fill(volume)  # full: the probe's write itself fails
        assert choose_compile_cache(config).location == "container"
        (warning,) = volume_warnings(caplog)
        assert "is not writable (No space left on device)" in warning
        assert [name for name in os.listdir(volume) if name.startswith(".gams-worker-write-probe")] == []


def test_with_no_writable_folder_vllm_is_told_to_save_nothing(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(compile_cache, "CONTAINER_DIR", str(blocker / "container"))
    monkeypatch.setattr(compile_cache, "TEMPORARY_DIR", str(blocker / "tmp"))
    cache = choose_compile_cache(load_config({"COMPILE_CACHE_DIR": str(blocker / "cc")}))
    assert cache.disabled and cache.engine_environment()["VLLM_DISABLE_COMPILE_CACHE"] == "1"
    assert cache.engine_defaults() == {}  # nowhere to keep vLLM's startup plan either
    (warning,) = volume_warnings(caplog)
    assert warning.endswith("vLLM compiles every start and saves nothing")


@pytest.mark.engine
def test_a_truncated_kernel_in_the_cache_costs_one_compile_not_every_start(two_starts, tiny_model_dir):
    # Reproduced before the fix: the model process memory-maps a truncated kernel, dies of
    # SIGBUS, and with the folder unchanged every later start failed the same way. The model's
    # kernels are the *.main.so files; the other .so is Inductor's CPU-ISA probe, which it loads
    # in a child process and, found broken, compiles for a lesser ISA (a slow engine, not a
    # failed start).
    folder = two_starts["second"]["compile_cache"]["path"]
    kernels = [os.path.join(where, name) for where, _, names in os.walk(folder) for name in names
               if name.endswith(".main.so")]
    assert kernels, folder
    for kernel in kernels:
        os.truncate(kernel, 1000)  # what a copy cut short leaves: the ELF header, no code
    run = start_once(tiny_model_dir, two_starts["cache_dir"], model_info_seed=str(two_starts["seed"]))
    log = run["log"]
    assert [line.split("engine start: ")[1] for line in log.splitlines() if "engine start: rung" in line] == [
        "rung 1/3, full mode (default)", "rung 1/3, full mode (default)"]  # the same mode, no rung dropped
    assert "cause: the compile cache looks damaged; evidence: Worker proc VllmWorker-0 died unexpectedly" in log
    assert "retrying in full mode with an empty folder" in log
    assert (run["engine"]["mode"], run["engine"]["reason"]) == ("full", "default")
    cache = run["compile_cache"]
    (aside,) = cache["set_aside"]
    assert cache["path"] == folder and aside.startswith(folder + ".damaged-")
    assert (cache["artifacts_before"], cache["hit"]) == (0, False)
    assert cache["new_artifacts"] > 0  # compiled anew into the folder, for the next start
