"""Start-up order: work that holds the GIL (the SDK's import, the garbage collection) waits for vLLM's engine process;
the start deadline reaches vLLM before its engine classes are imported."""

import functools
import importlib
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from gams_worker.startup.timeline import StartupTimeline
from gams_worker.startup.deferred_work import DeferredWork
from tests.harness.worker_process import ROOT, subprocess_env


def stand_in_module(tmp_path, monkeypatch, name: str) -> str:
    (tmp_path / f"{name}.py").write_text("import time\nIMPORTED_AT = time.monotonic()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)  # and again after the test (monkeypatch undoes)
    return name


def test_imports_wait_for_the_engine_process(tmp_path, monkeypatch):
    name = stand_in_module(tmp_path, monkeypatch, "sdk_stand_in_engine")
    timeline = StartupTimeline()
    background = DeferredWork([(f"{name} imported", functools.partial(importlib.import_module, name))], timeline)
    time.sleep(0.5)
    assert name not in sys.modules  # no engine process yet: the import would compete with vLLM's set-up
    # A subprocess of another kind (vLLM inspects the model in one) is not the engine.
    subprocess.run([sys.executable, "-c", "import time; time.sleep(0.3)"], check=True)
    assert name not in sys.modules
    engine_process = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    engine_process.start()
    started = time.monotonic()
    try:
        while name not in sys.modules and time.monotonic() - started < 10:
            time.sleep(0.01)
        background.finish()
        assert sys.modules[name].IMPORTED_AT - started < 1.0
        assert f"{name} imported" in timeline.to_output()["since_process_start_s"]
    finally:
        engine_process.kill()
        engine_process.join()


def test_without_an_engine_process_the_imports_happen_when_the_start_ends(tmp_path, monkeypatch):
    name = stand_in_module(tmp_path, monkeypatch, "sdk_stand_in_no_engine")
    tasks = [(f"{module} imported", functools.partial(importlib.import_module, module))
             for module in ("no_such_module_here", name)]
    background = DeferredWork(tasks, StartupTimeline())
    assert name not in sys.modules
    background.finish()  # e.g. vLLM ran its engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    assert name in sys.modules  # after a task that failed


def test_after_a_failed_start_the_rest_is_skipped(tmp_path, monkeypatch):
    name = stand_in_module(tmp_path, monkeypatch, "sdk_stand_in_failed_start")
    background = DeferredWork([(f"{name} imported", functools.partial(importlib.import_module, name))],
                                   StartupTimeline())
    background.finish(run_the_rest=False)  # the worker exits with the start's error, without waiting
    assert name not in sys.modules


class EngineClassesImported(Exception):
    pass


def test_the_start_deadline_is_handed_to_vllm_before_its_engine_classes_are_imported(monkeypatch):
    """vLLM's own wait for its engine process (VLLM_ENGINE_READY_TIMEOUT_S, 600 s by default) is read
    when its engine classes are imported: set from ENGINE_START_TIMEOUT_S before, it never ends a start first."""
    from gams_worker import worker
    from gams_worker.config import load_config
    from gams_worker.startup.plan import NO_DEADLINE_S

    seen = []

    def import_engine_classes():
        seen.append(os.environ.get("VLLM_ENGINE_READY_TIMEOUT_S"))
        raise EngineClassesImported

    monkeypatch.setattr(worker, "import_engine_classes", import_engine_classes)
    for timeout, handed in (("2400", "2400"), ("0", str(NO_DEADLINE_S))):  # 0: no deadline, for vLLM too
        monkeypatch.setenv("VLLM_ENGINE_READY_TIMEOUT_S", "600")  # restored after the test
        with pytest.raises(EngineClassesImported):
            worker.start_worker(load_config({"MODEL_NAME": "/nonexistent", "ENGINE_START_TIMEOUT_S": timeout}))
    assert seen == ["2400", str(NO_DEADLINE_S)]


def test_vllm_waits_for_its_engine_process_as_long_as_it_was_told():
    code = ("import os; from gams_worker.config import load_config; from gams_worker.startup.plan import "
            "engine_ready_timeout; os.environ.update(engine_ready_timeout(load_config({'ENGINE_START_TIMEOUT_S': "
            "'2400'}))); from vllm.v1.engine import core_client; print(core_client.VLLM_ENGINE_READY_TIMEOUT_S)")
    printed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env=subprocess_env(), check=True).stdout
    assert printed.strip().splitlines()[-1] == "2400"


def test_every_bad_words_list_the_limits_allow_fits_vllms_token_budget(tiny_model_dir):
    """vLLM's GPU model runner raises inside its engine (the engine dies) on bad words over
    VLLM_MAX_BAD_WORDS_TOTAL_TOKENS: the budget the worker hands vLLM holds the worst list its limits allow,
    tokenized as vLLM tokenizes it (byte-fallback tokens of 4-byte characters, with and without a space)."""
    from vllm import SamplingParams
    from vllm.tokenizers.registry import get_tokenizer

    from gams_worker.config import load_config
    from gams_worker.startup.plan import bad_words_budget

    config = load_config({"MODEL_NAME": tiny_model_dir})
    limits = config.input_limits
    words = [chr(0x1D11E + i) * limits.max_stop_length for i in range(limits.max_bad_words)]
    params = SamplingParams(bad_words=words)
    params.update_from_tokenizer(get_tokenizer(tiny_model_dir))
    tokens = sum(len(ids) for ids in params.bad_words_token_ids)
    assert tokens > 1024  # over vLLM's default: the budget matters
    assert tokens <= int(bad_words_budget(config)["VLLM_MAX_BAD_WORDS_TOTAL_TOKENS"])
