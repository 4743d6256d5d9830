"""Hostile input through the real SDK loop: `python handler.py` on the tiny model, the runpod SDK
job loop and the RunPod emulator (tests/harness/runpod_emulator.py), both dialects.

Every case of tests/harness/hostile_cases.py is one job, each followed by a normal streaming
job of its dialect that must still stream: the hostile job must end with an error naming its
field (or be served, where it is the caller's own raw prompt), and no job may be lost. One
worker process serves the whole module (engine starts are the cost); its last test kills the
engine under an OpenAI stream. The no-engine half, every case against the input contract, runs
on its own too: ``python -m tests.harness.hostile_cases --contract-only`` (and
test_the_contract_alone_refuses_each_case_by_field below).
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List

import pytest

from tests.harness import hostile_cases
from tests.harness.hostile_cases import CHAT, ENGINE, SERVED, SUITE_GRAMMAR_TIMEOUT_S, TAKE, Case, error_field
from tests.harness.runpod_emulator import JobRecord, RunPodEmulator
from tests.harness.worker_process import start_platform_worker, wait_for_first_take

JOB_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def platform(tiny_model_dir, tmp_path_factory):
    emulator = RunPodEmulator(hold_s=1.0)
    emulator.start()
    worker = start_platform_worker(emulator, tiny_model_dir, tmp_path_factory.mktemp("hostile-worker"),
                                   "hostile-worker", MAX_CONCURRENCY="16",
                                   GRAMMAR_COMPILE_TIMEOUT_S=SUITE_GRAMMAR_TIMEOUT_S)
    try:
        wait_for_first_take(emulator, worker)
        yield emulator, worker
    finally:
        worker.terminate(60)
        emulator.close()


def submit(emulator: RunPodEmulator, case: Case) -> str:
    return emulator.submit_raw(case.raw) if case.raw is not None else emulator.submit(case.input)


def normal_job(dialect: str) -> Dict[str, Any]:
    if dialect == "openai":
        return {"openai_route": CHAT, "openai_input": {
            "messages": [{"role": "user", "content": "Živjo!"}], "max_tokens": 8, "ignore_eos": True, "stream": True}}
    return {"prompt": "Ljubljana je", "sampling_params": {"max_tokens": 8, "ignore_eos": True}, "stream": True}


def streamed(record: JobRecord, dialect: str) -> bool:
    """The job completed after streaming its text in chunks."""
    if record.result is None or "error" in record.result or not record.chunks:
        return False
    if dialect == "openai":
        events = "".join(record.chunk_outputs)
        return events.endswith("data: [DONE]\n\n") and '"content"' in events
    return record.chunk_outputs[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.engine
def test_each_hostile_job_is_refused_by_field_and_the_next_job_streams(platform):
    emulator, worker = platform
    tried, refused, served, lost, wrong, stalled, engine_refusals = 0, 0, 0, [], [], [], []
    started = time.monotonic()
    for case in hostile_cases.cases():
        tried += 1
        job_id = submit(emulator, case)
        try:
            record = emulator.wait_result(job_id, JOB_TIMEOUT_S)
        except TimeoutError:
            lost.append(case.name)
            continue
        output = record.result if "error" in record.result else None  # the job's error, if it failed
        got = error_field(output)
        if case.field is not None and got == case.field:
            error = json.loads(output["error"])
            assert error.get("type") == "invalid_input" or error.get("code") == 400, (case.name, error)
            assert error["message"], case.name
            refused += 1
            if case.stage == ENGINE:  # refused where only the engine's side knows: say how
                engine_refusals.append(f"  {case.name}: {error['message'][:150]}")
        elif case.field is None and output is None:
            served += 1
        else:
            wrong.append(f"{case.name} [{case.stage}]: expected {case.field!r}, got {record.result!r}"[:400])
        dialect = "plain" if case.stage == TAKE else case.dialect
        after = emulator.wait_result(emulator.submit(normal_job(dialect)), JOB_TIMEOUT_S)
        if not streamed(after, dialect):
            stalled.append(f"after {case.name}: {after.result!r}"[:300])
    print(f"\n[hostile input] {tried} cases tried, {refused} refused with the named field, {served} served as "
          f"the caller's own, {len(lost)} lost, {len(wrong)} wrong; a normal job streamed after each: "
          f"{tried - len(stalled)}/{tried} ({time.monotonic() - started:.0f} s)\n" + "\n".join(engine_refusals))
    assert lost == []
    assert wrong == []
    assert stalled == []
    assert worker.alive()
    assert refused + served == tried
    assert served == sum(case.stage == SERVED for case in hostile_cases.cases())


def test_the_contract_alone_refuses_each_case_by_field():
    """What ``python -m tests.harness.hostile_cases --contract-only`` checks, no engine: the
    contract refuses its cases by field and lets through what only the engine can refuse."""
    check = hostile_cases.contract_checker()
    outcomes = {case.name: check(case) for case in hostile_cases.cases()}
    expected = {case.name: case.field if case.stage not in (ENGINE, SERVED) else None for case in hostile_cases.cases()}
    assert outcomes == expected
    assert sum(case.stage == ENGINE for case in hostile_cases.cases()) >= 5  # the engine suite has its own cases


@pytest.mark.engine
def test_an_openai_stream_on_a_dead_engine_fails_with_an_error(platform):
    """Ends the module's worker: keep it last. vLLM ends such a stream with an error event and
    ``[DONE]``; the job must end FAILED with that error, after the text it streamed."""
    emulator, worker = platform
    body = {"messages": [{"role": "user", "content": "Živjo!"}], "max_tokens": 3500, "ignore_eos": True, "stream": True}
    job_id = emulator.submit({"openai_route": CHAT, "openai_input": body})
    emulator.wait_chunks(job_id, 2, JOB_TIMEOUT_S)
    worker.engine_core().kill()
    record = emulator.wait_result(job_id, 30)
    assert record.status == "FAILED", record.result
    error = json.loads(record.result["error"])
    assert error["code"] >= 500 and error["message"], error
    assert worker.proc.wait(30) != 0  # the watchdog: RunPod replaces the worker
    chunks: List[str] = record.chunk_outputs
    assert chunks and all("[DONE]" not in chunk for chunk in chunks)  # never reported as a complete stream
