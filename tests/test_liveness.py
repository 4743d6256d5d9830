"""Liveness: a hung engine (while serving or while starting) ends the worker with one line and exit 1.

End to end: `python handler.py` under the real runpod SDK loop against the job-API emulator; its
engine core is stopped with SIGSTOP while a job streams (a hung engine, not a dead one), and the
worker must exit within ENGINE_STALL_TIMEOUT_S with the job's error posted. A start that hangs
inside vLLM's engine process (tests/harness/fault_injection.py) must end at
ENGINE_START_TIMEOUT_S with one line and no process left. The watchdogs' own logic is unit-tested
with fakes first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, List

import psutil
import pytest

from gams_worker.serving.watchdog import EngineWatchdog, StepClock
from gams_worker.startup.start_deadline import StartDeadline
from tests.harness.fault_injection import HANG
from tests.harness.runpod_emulator import RunPodEmulator
from tests.harness.worker_process import (ROOT, engine_env, start_platform_worker, subprocess_env,
                                          wait_for_first_take, wait_until)

SLOVENE = "Kaj je vredno videti v Ljubljani? Čebele, šolske žlice in žganci"


# ---------------------------------------------------------------- unit tests, no engine
class FakeEngine:
    """What the watchdog reads of vLLM's AsyncLLM: ``errored`` and the output processor's count."""

    def __init__(self, in_flight: int = 0):
        self.errored = False
        self.in_flight = in_flight
        self.output_processor = self

    def get_num_unfinished_requests(self) -> int:
        return self.in_flight

    def update_scheduler_stats(self, scheduler_stats) -> None:  # vLLM's, once per engine-core message
        self.stats_updates = getattr(self, "stats_updates", 0) + 1


class Recorder:
    def __init__(self, on_call=None):
        self.calls: List[Any] = []
        self._on_call = on_call

    def __call__(self, arg: Any) -> None:
        self.calls.append(list(arg) if not isinstance(arg, int) else arg)
        if self._on_call:
            self._on_call()


def test_a_hung_engine_is_killed_then_the_worker_exits_1(caplog):
    engine = FakeEngine(in_flight=3)
    clock = StepClock()
    kill = Recorder(on_call=lambda: setattr(engine, "errored", True))  # vLLM notices its core gone
    exit_process = Recorder()
    EngineWatchdog(engine, clock, stall_timeout_s=0.3, engine_pids=(111, 222), interval_s=0.05,
                   kill=kill, exit_process=exit_process)
    wait_until(lambda: exit_process.calls, 10, "the watchdog's exit")
    assert kill.calls == [[111, 222]] and exit_process.calls == [1]
    critical = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
    assert len(critical) == 1 and critical[0].startswith("the vLLM engine is hung: no output for ")
    assert "with 3 requests in flight (ENGINE_STALL_TIMEOUT_S=0.3)" in critical[0]


def test_engine_output_keeps_the_watchdog_quiet_and_its_end_starts_the_clock():
    engine = FakeEngine(in_flight=1)
    clock = StepClock()
    exit_process = Recorder()
    stamping = threading.Event()
    stamping.set()

    clock.watch(engine)  # as the worker does, once the engine started

    def steps():  # what vLLM's output handler does once per message of its engine core
        while stamping.is_set():
            engine.output_processor.update_scheduler_stats(None)
            time.sleep(0.02)

    threading.Thread(target=steps, daemon=True).start()
    kill = Recorder(on_call=lambda: setattr(engine, "errored", True))
    EngineWatchdog(engine, clock, stall_timeout_s=0.3, interval_s=0.05, kill=kill, exit_process=exit_process)
    time.sleep(1.5)  # five times the deadline, with output all along
    assert exit_process.calls == []
    stamping.clear()
    assert engine.stats_updates > 10  # the watched call still reaches vLLM's own
    stopped_at = time.monotonic()
    wait_until(lambda: exit_process.calls, 10, "the watchdog's exit")
    assert time.monotonic() - stopped_at >= 0.3


def test_the_stall_counts_from_the_first_request_after_an_idle_time():
    engine = FakeEngine(in_flight=0)
    clock = StepClock()
    watchdog = EngineWatchdog(engine, clock, stall_timeout_s=60, interval_s=3600)  # its thread never looks
    clock.last_output_at = 0.0  # the last output was long ago
    assert watchdog.quiet_for(1000.0) is None  # idle: no deadline
    engine.in_flight = 2
    assert watchdog.quiet_for(1000.0) == 0.0  # the request just came: its time starts now
    assert watchdog.quiet_for(1010.0) == 10.0
    clock.last_output_at = 1012.0
    assert watchdog.quiet_for(1013.0) == 1.0
    engine.in_flight = 0
    assert watchdog.quiet_for(2000.0) is None
    engine.in_flight = 1
    assert watchdog.quiet_for(2000.0) == 0.0
    watchdog.stop()


def test_a_dead_engine_exits_1_without_a_kill_and_a_stopped_watchdog_never_exits(caplog):
    engine = FakeEngine()
    kill, exit_process = Recorder(), Recorder()
    EngineWatchdog(engine, StepClock(), stall_timeout_s=0.2, interval_s=0.05, kill=kill, exit_process=exit_process)
    engine.errored = True
    wait_until(lambda: exit_process.calls, 10, "the watchdog's exit")
    assert exit_process.calls == [1] and kill.calls == []
    assert "the vLLM engine is dead" in caplog.text

    stopped_engine = FakeEngine(in_flight=1)
    stopped_exit = Recorder()
    watchdog = EngineWatchdog(stopped_engine, StepClock(), stall_timeout_s=0.2, interval_s=0.05,
                              kill=Recorder(), exit_process=stopped_exit)
    watchdog.stop()  # a clean shutdown: the engine's end must not look like a hang or a crash
    stopped_engine.errored = True
    time.sleep(0.6)
    assert stopped_exit.calls == []


def test_the_start_deadline_kills_the_start_and_exits_if_the_start_does_not_end(caplog):
    kill, exit_process = Recorder(), Recorder()
    deadline = StartDeadline(0.2, grace_s=0.2, kill=kill, exit_process=exit_process)
    wait_until(lambda: exit_process.calls, 10, "the deadline's exit")
    assert deadline.expired and exit_process.calls == [1] and len(kill.calls) == 2
    assert "not finished after ENGINE_START_TIMEOUT_S=0.2 s" in caplog.text
    assert deadline.message("full") == ("engine start did not finish within ENGINE_START_TIMEOUT_S=0.2 s "
                                        "(in full mode); its processes were killed")

    ended = StartDeadline(0.2, grace_s=5, kill=Recorder(), exit_process=(ended_exit := Recorder()))
    wait_until(lambda: ended.expired, 10, "the deadline")
    ended.done()  # the ladder ended the killed start with its EngineStartError
    time.sleep(0.3)
    assert ended_exit.calls == []

    in_time = StartDeadline(0.3, kill=(in_time_kill := Recorder()), exit_process=Recorder())
    in_time.done()
    time.sleep(0.5)
    assert not in_time.expired and in_time_kill.calls == []


# ---------------------------------------------------------------- end to end, real engine
STALL_TIMEOUT_S = 6


@pytest.mark.engine
def test_a_hung_engine_core_ends_the_worker_within_the_deadline_and_the_job_gets_its_error(
        tiny_model_dir, tmp_path):
    emulator = RunPodEmulator(hold_s=1.0)
    emulator.start()
    worker = start_platform_worker(emulator, tiny_model_dir, tmp_path, "worker-hung", MAX_CONCURRENCY="4",
                                   MAX_MODEL_LEN="8192", ENFORCE_EAGER="true",
                                   ENGINE_STALL_TIMEOUT_S=str(STALL_TIMEOUT_S))
    try:
        wait_for_first_take(emulator, worker)
        # Four sequences of 8000 tokens: still streaming when the engine core is stopped below.
        job_id = emulator.submit({"prompt": SLOVENE, "stream": True, "sampling_params": {
            "max_tokens": 8000, "n": 4, "temperature": 0.8, "ignore_eos": True}})
        emulator.wait_chunks(job_id, 1, 120)
        # Streaming for longer than the deadline does not fire it: the engine's output stamps the clock.
        time.sleep(STALL_TIMEOUT_S + 1)
        chunks_before_stop = len(emulator.jobs[job_id].chunks)
        assert worker.alive() and not emulator.jobs[job_id].results, worker.tail()
        core = worker.engine_core()
        core.send_signal(signal.SIGSTOP)  # hung, not dead: vLLM sees nothing wrong
        stopped_at = time.monotonic()
        returncode = worker.proc.wait(STALL_TIMEOUT_S + 60)
        exit_s = time.monotonic() - stopped_at
        print(f"\n[hung engine] worker exited with status {returncode} {exit_s:.1f} s after its engine core "
              f"was stopped (ENGINE_STALL_TIMEOUT_S={STALL_TIMEOUT_S})")
        assert returncode == 1, worker.tail()
        assert STALL_TIMEOUT_S - 1 <= exit_s <= STALL_TIMEOUT_S + 30, exit_s
        critical = [line for line in worker.stderr().splitlines() if " CRITICAL " in line]
        assert len(critical) == 1 and "the vLLM engine is hung: no output for" in critical[0], critical
        assert not psutil.pid_exists(core.pid) or core.status() == psutil.STATUS_ZOMBIE  # killed, not left stopped
        record = emulator.wait_result(job_id, 5)
        assert len(record.chunks) >= chunks_before_stop > 1
        error = json.loads(record.result["error"])  # posted, not lost
        assert error["type"] == "engine_dead", error
    finally:
        worker.terminate(timeout=5)  # and the SDK's heartbeat process the exit leaves in the group
        emulator.close()


@pytest.mark.engine
def test_a_start_that_hangs_ends_at_the_start_deadline_with_one_line_and_no_process_left(tiny_model_dir, tmp_path):
    hang = tmp_path / "hang.txt"
    hang.write_text(HANG)
    job = json.dumps({"input": {"prompt": "Bled", "sampling_params": {"max_tokens": 4}}})
    process = subprocess.Popen(
        [sys.executable, "handler.py", "--test_input", job], cwd=ROOT, process_group=0,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(**engine_env(tiny_model_dir, ENFORCE_EAGER="true", ENGINE_START_TIMEOUT_S="20",
                                        GAMS_TEST_INJECT_START_FAILURE=str(hang))))
    try:
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 1, stderr[-4000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("gams-worker: engine start did not finish within ENGINE_START_TIMEOUT_S=20 s"), \
        stderr[-4000:]
    assert "engine start: not finished after ENGINE_START_TIMEOUT_S=20 s" in stderr
    assert "retrying" not in stderr  # a hung start is not a graph-mode failure

    def group_gone() -> bool:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(group_gone, 15, "the worker's processes to be gone")
