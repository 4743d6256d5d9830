"""`python handler.py` as a worker process, for tests and benchmarks: the environment it runs in
(the tiny model on this CPU machine, the platform's variables left out), its process group, its
output in files, and waiting for it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import psutil

from tests.harness.runpod_emulator import RunPodEmulator

ROOT = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT_S = 240  # engine starts take 30-90 s on this 2-core machine beside other engines
# Set in this process by an in-process worker for its engine (gams_worker/startup/plan.py);
# a worker subprocess must choose its own.
ENGINE_EXPORTS = ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "VLLM_ENGINE_READY_TIMEOUT_S")


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


def subprocess_env(**env: str) -> Dict[str, str]:
    """The current environment without the platform's variables, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_") and k not in ENGINE_EXPORTS}
    base.update(env)
    return base


# What Python's interpreter teardown printed after vLLM and Triton before the worker ended
# its process itself (gams_worker/processes.py, end_process).
EXIT_NOISE = ("Traceback", "Exception ignored", "nanobind", "leaked")


def exit_noise(*outputs: str) -> list:
    """The lines of a worker's stdout/stderr that look like a crash or a leak report."""
    return [line for output in outputs for line in output.splitlines() if any(n in line for n in EXIT_NOISE)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorkerProcess:
    """`python handler.py` in its own process group, its stdout and stderr in files under ``cwd``.

    Not in its own session: with scheduler autogroups (Linux's default) a new session is a new
    CPU group, and on the 2-core CI machine the busy engine's group starved this one (pytest
    and the emulator) for 10-14 s at a time."""

    def __init__(self, env: Dict[str, str], cwd: Path, name: str, args: tuple = ()):
        self.cwd = cwd
        self.stdout_path = cwd / f"{name}.stdout"
        self.stderr_path = cwd / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "handler.py"), *args],
                cwd=cwd, env=env, stdout=out, stderr=err, process_group=0,
            )
        self.pid = self.proc.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def tail(self) -> str:
        return f"--- stdout:\n{self.stdout()[-3000:]}\n--- stderr:\n{self.stderr()[-3000:]}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def engine_core(self) -> psutil.Process:
        for child in psutil.Process(self.pid).children(recursive=True):
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
        raise AssertionError("no EngineCore child process found")

    def rss_mib(self, with_children: bool = False) -> float:
        process = psutil.Process(self.pid)
        processes = [process] + (process.children(recursive=True) if with_children else [])
        return sum(p.memory_info().rss for p in processes) / 2**20

    def kill_group(self) -> None:
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 120) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._reap_group()

    def _reap_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # leftovers of a failed test only
        except ProcessLookupError:
            pass


def start_platform_worker(emulator: RunPodEmulator, model_dir: str, cwd: Path, name: str,
                          **overrides: str) -> WorkerProcess:
    settings = {"GPU_MEMORY_UTILIZATION": "0.05", "MAX_MODEL_LEN": "4096", **overrides}
    env = subprocess_env(**{**engine_env(model_dir, **settings), **emulator.worker_env()})
    return WorkerProcess(env, cwd, name)


def wait_until(condition, timeout: float, what: str, worker: Optional[WorkerProcess] = None, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if worker is not None and not worker.alive():
            raise AssertionError(f"worker exited ({worker.proc.returncode}) while waiting for {what}\n{worker.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})" + (f"\n{worker.tail()}" if worker else ""))
        time.sleep(step)


def wait_for_first_take(emulator: RunPodEmulator, worker: WorkerProcess, since: int = 0) -> Dict[str, str]:
    """The query of the worker's first job-take request after ``since`` earlier ones."""
    wait_until(lambda: len(emulator.takes) > since, START_TIMEOUT_S, "the worker's first job-take", worker)
    return emulator.takes[since][1]
