"""The fallback ladder end to end: ``python handler.py`` on the real vLLM CPU engine.

A test-only setting makes the first engine start fail from inside vLLM's engine
process with a given text (tests/harness/fault_injection.py); the worker must read
the cause from that process's output, pick the next rung, and serve the job there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.worker_process import ROOT, engine_env, subprocess_env

pytestmark = pytest.mark.engine

SEED_FAILURE = """\
INFO Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 51/51
INFO Capturing CUDA graphs (decode, FULL):   0%|          | 0/35
torch.AcceleratorError: CUDA error: the provided PTX was compiled with an unsupported toolchain.
Search for the following error message `cudaErrorUnsupportedPtxVersion'
"""
JOB = {"input": {"prompt": "Ljubljana je", "sampling_params": {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}}}


def run_worker(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps(JOB)],
        cwd=ROOT, env=subprocess_env(**env), capture_output=True, text=True, timeout=600,
    )


def job_outputs(stdout: str) -> list:
    """The job's outputs, which the local run prints one JSON object a line (vLLM logs to stdout too)."""
    objects = [json.loads(line) for line in stdout.splitlines() if line.startswith("{") and line.endswith("}")]
    return [obj for obj in objects if "choices" in obj or "error" in obj]


def attempts(stderr: str) -> list:
    return [line for line in stderr.splitlines() if "engine start: rung" in line]


def test_capture_failure_in_the_engine_process_falls_back_to_piecewise(tiny_model_dir, tmp_path):
    failure = tmp_path / "failure.txt"
    failure.write_text(SEED_FAILURE, encoding="utf-8")
    result = run_worker(engine_env(tiny_model_dir, GAMS_TEST_INJECT_START_FAILURE=str(failure)))
    assert result.returncode == 0, result.stderr[-4000:]
    assert not failure.exists()  # the engine process took the failure: only the first attempt failed

    log = result.stderr
    assert [line.split("engine start: ")[1] for line in attempts(log)] == [
        "rung 1/3, full mode (default)",
        "rung 2/3, piecewise mode (FULL CUDA-graph capture failed: unsupported PTX (driver older than the "
        "CUDA toolkit); fell back from full)",
    ]
    assert ("engine start in full mode failed after" in log
            and "cause: FULL CUDA-graph capture failed: unsupported PTX" in log), log[-4000:]
    assert "evidence: torch.AcceleratorError: CUDA error: the provided PTX was compiled" in log
    assert "retrying at rung 2/3 in piecewise mode" in log

    outputs = job_outputs(result.stdout)
    assert outputs and all("error" not in output for output in outputs), result.stdout[-4000:]
    engine = outputs[-1]["engine"]
    assert engine["mode"] == "piecewise"
    assert engine["reason"].startswith("FULL CUDA-graph capture failed: unsupported PTX")
    assert engine["reason"].endswith("fell back from full")
    assert outputs[-1]["usage"]["completion_tokens"] == 8


def test_model_not_found_in_the_engine_process_exits_after_one_attempt(tiny_model_dir, tmp_path):
    failure = tmp_path / "failure.txt"
    failure.write_text("OSError: Cannot find any model weights with `/models/GaMS-9B-Instruct`\n", encoding="utf-8")
    result = run_worker(engine_env(tiny_model_dir, GAMS_TEST_INJECT_START_FAILURE=str(failure)))
    assert result.returncode == 1, result.stderr[-4000:]
    assert len(attempts(result.stderr)) == 1
    assert "retrying" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("gams-worker: engine start failed in full mode: model not found"), last_line
    assert "check MODEL_NAME" in last_line
    assert job_outputs(result.stdout) == []


def test_missing_model_directory_exits_without_retrying(tiny_model_dir):
    result = run_worker(engine_env(tiny_model_dir, MODEL_NAME="/nonexistent"))
    assert result.returncode == 1, result.stderr[-4000:]
    # The model is looked for before the engine (model_source); either way, no second attempt.
    assert len(attempts(result.stderr)) <= 1
    assert "retrying" not in result.stderr
    assert "doctor report:" in result.stderr  # the doctor ran first and did not stop the worker
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("gams-worker: ") and "/nonexistent" in last_line, last_line
    assert "not found" in last_line
