"""Start-up order: work that holds the GIL (the SDK's import, the garbage collection) waits for vLLM's engine process."""

import functools
import importlib
import multiprocessing
import subprocess
import sys
import time

from gams_worker.startup.timeline import StartupTimeline
from gams_worker.startup.deferred_work import DeferredWork


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
