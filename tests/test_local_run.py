"""`python handler.py` off the platform really streams test_input.json through the engine."""

import asyncio
import json
import re
import subprocess
import sys

import pytest

from gams_worker.config import WorkerConfig
from gams_worker.errors import error_output
from gams_worker.platform.local_run import read_test_job, run_job, run_local, wants_local_run
from tests.harness.worker_process import ROOT, engine_env, exit_noise, subprocess_env


@pytest.mark.engine
def test_handler_py_streams_test_input_json(tiny_model_dir):
    # Also: a GaMS preset applied to the tiny model, overridden by the environment where set,
    # and the job concurrency sized from the KV cache the engine really got.
    env = engine_env(tiny_model_dir, MODEL_PRESET="cjvt/GaMS-2B-Instruct")
    del env["MAX_MODEL_LEN"], env["MAX_CONCURRENCY"]
    result = subprocess.run(
        [sys.executable, "handler.py"], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=subprocess_env(**env),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_model_len=8192 (preset)" in result.stderr
    assert "gpu_memory_utilization=0.2 (env)" in result.stderr
    expected = WorkerConfig().expected_tokens_per_job  # the default
    sizing = re.search(rf"concurrency: (\d+) jobs = KV cache (\d+) tokens / EXPECTED_TOKENS_PER_JOB {expected}, "
                       r"at most max_num_seqs (\d+)", result.stderr)
    assert sizing, result.stderr[-3000:]
    jobs, kv_tokens, max_num_seqs = map(int, sizing.groups())
    assert jobs == max(1, min(kv_tokens // expected, max_num_seqs))
    lines = result.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("--- local job local-test")))
    end = lines.index("--- aggregate output:")
    chunks = [json.loads(line) for line in lines[start + 1:end] if line.startswith('{"choices"')]
    assert len(chunks) >= 2  # streamed, not one blob
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    aggregate = json.loads(lines[end + 1])
    assert aggregate["output"] == chunks
    assert exit_noise(result.stdout, result.stderr) == []  # a finished run ends quietly


@pytest.mark.engine
def test_a_bad_job_ends_the_local_run_with_its_json_error_and_no_traceback(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "handler.py", "--test_input", '{"input": {"prompt": "Bled", "sampling_params": {"n": 500}}}'],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=subprocess_env(**engine_env(tiny_model_dir, ENFORCE_EAGER="true")),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    error = {"type": "invalid_input", "message": "has 500 choices; MAX_N allows at most 16", "field": "sampling_params.n"}
    (line,) = [line for line in result.stdout.splitlines() if line.startswith('{"error"')]
    assert json.loads(json.loads(line)["error"]) == error
    last = result.stderr.splitlines()[-1]
    assert last.startswith("--- job failed: ") and json.loads(last[len("--- job failed: "):]) == error
    assert exit_noise(result.stdout, result.stderr) == []


def test_local_mode_is_chosen_like_the_sdk_does():
    assert wants_local_run(["handler.py"], on_runpod=False)
    assert not wants_local_run(["handler.py"], on_runpod=True)
    assert wants_local_run(["handler.py", "--test_input", "{}"], on_runpod=True)
    assert not wants_local_run(["handler.py", "--rp_serve_api"], on_runpod=False)


def test_test_input_argument_wins_over_the_file():
    job = read_test_job(["handler.py", "--test_input", '{"input": {"prompt": "x"}}'])
    assert job == {"input": {"prompt": "x"}, "id": "local-test"}
    assert read_test_job([])["input"] == json.loads((ROOT / "test_input.json").read_text())["input"]


def test_each_output_is_printed_as_it_arrives_and_errors_exit_1(capsys):
    async def handler(job):
        yield {"choices": [{"index": 0, "text": "Lju"}]}
        yield error_output("invalid_input", "bad", "prompt")

    outputs = asyncio.run(run_job(handler, {"id": "j"}))
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == outputs
    assert run_local(handler, ["handler.py", "--test_input", '{"input": {}}']) == 1
    assert "job failed" in capsys.readouterr().err
