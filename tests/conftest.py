"""Shared fixtures: the tiny GaMS-shaped model and one real vLLM CPU engine per session.

Starting vLLM costs 20-60 s on CPU, so every in-process engine test shares one
worker. Its asyncio loop runs in a background thread (the engine's output handler
lives in the loop of the first request); tests submit coroutines to it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder import tiny_model  # noqa: E402


def engine_env(model_dir: str, **overrides: str) -> Dict[str, str]:
    """Environment for a worker on the tiny model on this CPU machine."""
    env = {
        "MODEL_NAME": model_dir,
        "MAX_MODEL_LEN": "512",
        "GPU_MEMORY_UTILIZATION": "0.2",  # on CPU: share of one NUMA node's RAM
        "MAX_CONCURRENCY": "32",
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.update(overrides)
    return env


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
    from gams_worker.startup.worker import start_worker

    config = load_config(engine_env(tiny_model_dir))
    worker = start_worker(config)
    yield worker
    worker.close()


async def collect(service, job: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [output async for output in service.run(job)]


@pytest.fixture(scope="session")
def run_job(worker, loop_thread):
    """run_job(input_dict) -> the list of outputs the job yielded."""
    counter = iter(range(10**9))

    def run(job_input: Any) -> List[Dict[str, Any]]:
        job = {"id": f"test-{next(counter)}", "input": job_input}
        return loop_thread.run(collect(worker.service, job))

    return run


# Set in this process by the in-process worker for its engine (gams_worker/startup/compile_cache.py);
# a worker subprocess must choose its own.
ENGINE_EXPORTS = ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "VLLM_USE_MEGA_AOT_ARTIFACT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**env: str) -> Dict[str, str]:
    """The current environment without the platform's variables, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_") and k not in ENGINE_EXPORTS}
    base.update(env)
    return base
