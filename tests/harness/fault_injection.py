"""Test-only: make an engine start fail from inside vLLM's engine process.

With GAMS_TEST_INJECT_START_FAILURE naming a file, the engine is started with
``worker_cls`` = ``FailingStartWorker``: the platform's own worker class that, when
loading the model, raises a RuntimeError with the file's text, which vLLM's engine
core logs as it logs a real failure. The
file is consumed (deleted) so that only the first attempt fails and the fallback
ladder's next rung starts normally. The failure thus originates in the child
process, and the parent sees only vLLM's generic "Engine core initialization failed".
A file holding ``HANG`` makes that load hang instead (a stuck engine start).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from gams_worker.config import variable_of

INJECTION_VARIABLE = variable_of("inject_start_failure")
HANG = "gams-test: hang"  # the file's text that makes the first start hang


def _platform_worker_class() -> type:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


def take_failure_text(path: str) -> str:
    """The injected failure text, deleting the file; "" once it has been taken."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        os.remove(path)
    except FileNotFoundError:
        return ""
    return text


class FailingStartWorker(_platform_worker_class()):  # type: ignore[misc]
    # Fails in load_model, before vLLM compiles and warms up (a minute of CPU in tests);
    # the classifier reads the stage from the injected text itself.
    def load_model(self, *args: Any, **kwargs: Any) -> Any:
        path = os.environ.get(INJECTION_VARIABLE)  # inherited from the worker's process
        text = take_failure_text(path) if path else ""
        if text.strip() == HANG:
            threading.Event().wait()  # for ever: only the start deadline ends this
        if text:
            raise RuntimeError(text)
        return super().load_model(*args, **kwargs)
