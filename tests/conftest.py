"""Shared fixtures: the tiny GaMS-shaped model and one real vLLM CPU engine per session.

Starting vLLM costs 20-60 s on CPU, so every in-process engine test shares one
worker. Its asyncio loop runs in a background thread (the engine's output handler
lives in the loop of the first request); tests submit coroutines to it.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder import tiny_model  # noqa: E402
from tests.harness.worker_process import engine_env  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    return str(tiny_model.build())


class LoopThread:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for the result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture(scope="session")
def loop_thread() -> LoopThread:
    return LoopThread()


@pytest.fixture(scope="session")
def worker(tiny_model_dir):
    from gams_worker.config import load_config
    from gams_worker.worker import start_worker

    config = load_config(engine_env(tiny_model_dir))
    worker = start_worker(config)
    yield worker
    worker.close()


async def collect(jobs, job: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [output async for output in jobs.run(job)]


@pytest.fixture(scope="session")
def run_job(worker, loop_thread):
    """run_job(input_dict) -> the list of outputs the job yielded (plain or OpenAI, as the handler routes it)."""
    counter = iter(range(10**9))

    def run(job_input: Any) -> List[Dict[str, Any]]:
        job = {"id": f"test-{next(counter)}", "input": job_input}
        return loop_thread.run(collect(worker.jobs, job))

    return run
