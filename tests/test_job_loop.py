"""The job loop (gams_worker/platform/job_loop.py) and its SDK-version guard, without an engine.

``JobLoop`` runs here exactly as ``runpod.serverless.start`` runs it, but with the take, the
job and the stop channel replaced through the SDK's own config hooks (``jobs_fetcher``,
``jobs_handler``, ``stop_signals_fetcher``, honoured when no RUNPOD_WEBHOOK_GET_JOB is set),
so each test controls when jobs arrive and end. The burst through the real worker, engine and
emulator is in tests/test_job_loop_platform.py.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import signal
import subprocess
import sys
import time
from typing import Any, Deque, Dict, List, Optional

import pytest
from runpod.serverless.modules import rp_scale
from runpod.serverless.modules.worker_state import JobsProgress

from gams_worker.platform import job_loop, sdk_version
from gams_worker.platform.job_loop import JobLoop, install_job_loop
from gams_worker.platform.sdk_version import SDK_VERSION, SdkVersionError, check_sdk_version
from tests.harness.worker_process import ROOT, subprocess_env

# The SDK sleeps 1 s where JobLoop waits on an event; anything taking half of that is the sleep.
PROMPT_S = 0.5


class FakePlatform:
    """RunPod's side of the loop: a job queue behind a long-poll take, a stop channel, and jobs
    that run until the test ends them."""

    def __init__(self, hold_s: float = 0.2):
        self.hold_s = hold_s
        self.pending: Deque[Dict[str, Any]] = collections.deque()
        self.takes: List[Dict[str, Any]] = []  # every take: when, how many asked, how many in flight
        self.started: Dict[str, float] = {}
        self.ended: Dict[str, str] = {}  # job id -> "done" or "stopped"
        self.running = 0
        self.max_running = 0
        self.gates: Dict[str, asyncio.Event] = {}
        self.stops: asyncio.Queue = asyncio.Queue()
        self.arrived = asyncio.Event()
        self.loop: Optional[JobLoop] = None

    def submit(self, count: int) -> List[str]:
        ids = [f"job-{len(self.gates) + i}" for i in range(count)]
        for job_id in ids:
            self.gates[job_id] = asyncio.Event()
            self.pending.append({"id": job_id, "input": {}})
        self.arrived.set()
        return ids

    def end(self, job_id: str) -> None:
        self.gates[job_id].set()

    async def take(self, session, num_jobs: int) -> Optional[List[Dict[str, Any]]]:
        self.takes.append({"at": time.monotonic(), "asked": num_jobs, "in_flight": len(JobsProgress())})
        deadline = time.monotonic() + self.hold_s
        while not self.pending and time.monotonic() < deadline:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                pass
        jobs = []
        while self.pending and len(jobs) < num_jobs:
            jobs.append(self.pending.popleft())
        return jobs or None

    async def run_job(self, session, config, job) -> None:
        self.started[job["id"]] = time.monotonic()
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await self.gates[job["id"]].wait()
            self.ended[job["id"]] = "done"
        except asyncio.CancelledError:
            self.ended[job["id"]] = "stopped"
            raise
        finally:
            self.running -= 1

    async def stop_signals(self, session) -> List[str]:
        return [await self.stops.get()]

    def config(self, concurrency: int) -> Dict[str, Any]:
        return {"handler": None, "concurrency_modifier": lambda current: concurrency,
                "jobs_fetcher": self.take, "jobs_handler": self.run_job,
                "stop_signals_fetcher": self.stop_signals}


async def wait_until(condition, timeout: float, what: str) -> float:
    """Seconds until ``condition()`` held; AssertionError naming ``what`` after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


@pytest.fixture(autouse=True)
def empty_progress_set():
    """The SDK's set of jobs in progress is one per process: a failed test must not leave jobs in it."""
    JobsProgress().clear()
    yield
    JobsProgress().clear()


async def start_loop(platform: FakePlatform, concurrency: int) -> asyncio.Task:
    platform.loop = JobLoop(platform.config(concurrency))
    return asyncio.create_task(platform.loop.run())


async def end_jobs(platform: FakePlatform, job_ids: List[str], total_ended: int) -> None:
    """End ``job_ids`` and wait until ``total_ended`` jobs have ended in all."""
    for job_id in job_ids:
        platform.end(job_id)
    await wait_until(lambda: len(platform.ended) == total_ended, 5, "all jobs ended")


async def shut_down(platform: FakePlatform, task: asyncio.Task) -> None:
    platform.loop.handle_shutdown(signal.SIGTERM, None)
    await platform.stops.put("no-such-job")  # ends the stop channel's wait
    await asyncio.wait_for(task, 10)


def test_a_burst_is_taken_up_to_the_concurrency_without_a_1s_wait():
    async def scenario():
        platform = FakePlatform()
        task = await start_loop(platform, 64)
        first = platform.submit(32)  # clients of one burst arrive over a few milliseconds
        await wait_until(lambda: platform.running == 32, 5, "the first 32 jobs running")
        second = platform.submit(32)
        waited = await wait_until(lambda: platform.running == 64, PROMPT_S, "all 64 jobs running")
        # Each job counted once: with 32 taken, 32 more were asked for, at once.
        assert platform.takes[1]["asked"] == 32 and platform.takes[1]["in_flight"] == 32, platform.takes[:3]
        await end_jobs(platform, first + second, 64)
        await shut_down(platform, task)
        return waited

    waited = asyncio.run(scenario())
    print(f"second half of the burst running {1000 * waited:.1f} ms after it arrived")


def test_a_freed_slot_is_refilled_at_once():
    async def scenario():
        platform = FakePlatform()
        task = await start_loop(platform, 4)
        ids = platform.submit(5)
        await wait_until(lambda: platform.running == 4, 5, "4 jobs running")
        await asyncio.sleep(0.3)
        assert platform.running == 4 and len(platform.pending) == 1, "took more jobs than its concurrency"
        assert all(take["asked"] <= 4 - take["in_flight"] for take in platform.takes), platform.takes
        platform.end(ids[0])
        waited = await wait_until(lambda: ids[4] in platform.started, PROMPT_S, "the fifth job started")
        assert platform.takes[-1]["asked"] == 1, platform.takes[-3:]
        await end_jobs(platform, ids[1:], 5)
        await shut_down(platform, task)
        return waited

    waited = asyncio.run(scenario())
    print(f"fifth job started {1000 * waited:.1f} ms after a slot freed")


def test_never_more_jobs_than_the_concurrency_modifier_allows():
    async def scenario():
        platform = FakePlatform(hold_s=0.05)
        task = await start_loop(platform, 8)
        rng = random.Random(14)
        ids = []
        for _ in range(20):  # 200 jobs in uneven bursts, each ending after a random time
            ids += platform.submit(rng.randint(1, 20))
            for job_id in ids:
                if job_id in platform.started and rng.random() < 0.5:
                    platform.end(job_id)
            await asyncio.sleep(rng.uniform(0, 0.02))
        for job_id in ids:
            platform.end(job_id)
        await wait_until(lambda: len(platform.ended) == len(ids), 20, "every job ended")
        assert all(take["asked"] + take["in_flight"] <= 8 for take in platform.takes), \
            [t for t in platform.takes if t["asked"] + t["in_flight"] > 8]
        assert platform.max_running == 8
        assert not JobsProgress(), "jobs left in the progress set that pings report"
        assert platform.loop.jobs_in_flight == 0
        await shut_down(platform, task)

    asyncio.run(scenario())


def test_a_job_handed_over_beyond_the_concurrency_runs_once_a_slot_frees():
    async def scenario():
        platform = FakePlatform()
        original_take = platform.take

        async def generous_take(session, num_jobs):  # a platform that hands out one job too many
            return await original_take(session, num_jobs + 1)

        platform.take = generous_take
        task = await start_loop(platform, 2)
        ids = platform.submit(3)
        await wait_until(lambda: platform.running == 2, 5, "2 jobs running")
        await asyncio.sleep(0.2)
        assert platform.running == 2 and ids[2] not in platform.started, "ran more jobs than its concurrency"
        platform.end(ids[0])
        await wait_until(lambda: ids[2] in platform.started, PROMPT_S, "the third job started in the freed slot")
        await end_jobs(platform, ids[1:3], 3)
        assert platform.max_running == 2
        await shut_down(platform, task)

    asyncio.run(scenario())


def test_jobs_in_progress_are_what_pings_report():
    async def scenario():
        platform = FakePlatform()
        task = await start_loop(platform, 4)
        ids = platform.submit(3)
        await wait_until(lambda: platform.running == 3, 5, "3 jobs running")
        assert sorted(JobsProgress().get_job_list().split(",")) == sorted(ids)
        platform.end(ids[1])
        await wait_until(lambda: len(JobsProgress()) == 2, 5, "the ended job left the progress set")
        assert ids[1] not in JobsProgress().get_job_list()
        for job_id in ids:
            platform.end(job_id)
        await wait_until(lambda: not JobsProgress(), 5, "progress set empty")
        await shut_down(platform, task)

    asyncio.run(scenario())


def test_a_stop_signal_stops_one_job_and_frees_its_slot():
    async def scenario():
        platform = FakePlatform()
        task = await start_loop(platform, 2)
        ids = platform.submit(3)
        await wait_until(lambda: platform.running == 2, 5, "2 jobs running")
        await platform.stops.put(ids[0])
        await wait_until(lambda: platform.ended.get(ids[0]) == "stopped", 5, "the stopped job cancelled")
        await wait_until(lambda: ids[2] in platform.started, PROMPT_S, "the third job took the freed slot")
        assert ids[1] not in platform.ended, "stopping one job ended another"
        await end_jobs(platform, ids[1:3], 3)
        await shut_down(platform, task)

    asyncio.run(scenario())


def test_sigterm_stops_taking_and_drains_every_taken_job():
    async def scenario():
        platform = FakePlatform(hold_s=0.3)
        task = await start_loop(platform, 4)
        ids = platform.submit(3)
        await wait_until(lambda: platform.running == 3, 5, "3 jobs running")
        await wait_until(lambda: len(platform.takes) >= 2, 5, "a take in flight for the free slot")
        platform.loop.handle_shutdown(signal.SIGTERM, None)
        late = platform.submit(2)  # the take in flight at SIGTERM brings one more in
        await platform.stops.put("no-such-job")
        await asyncio.sleep(0.5)
        assert not task.done(), "returned while taken jobs were still running"
        takes_after_sigterm = len(platform.takes)
        for job_id in ids + late:
            platform.end(job_id)
        await asyncio.wait_for(task, 10)
        assert len(platform.takes) == takes_after_sigterm, "took jobs after SIGTERM"
        assert platform.ended == {job_id: "done" for job_id in ids + late[:1]}, platform.ended
        assert list(p["id"] for p in platform.pending) == late[1:], "took more than the take in flight"
        assert not JobsProgress()

    asyncio.run(scenario())


def test_sigterm_ends_an_idle_loop_at_once():
    async def scenario():
        platform = FakePlatform(hold_s=0.05)
        task = await start_loop(platform, 4)
        ids = platform.submit(4)
        await wait_until(lambda: platform.running == 4, 5, "4 jobs running")  # get_jobs waits: full
        platform.loop.handle_shutdown(signal.SIGTERM, None)
        for job_id in ids:
            platform.end(job_id)
        await platform.stops.put("no-such-job")
        await asyncio.wait_for(task, 2)

    asyncio.run(scenario())


def test_a_stop_after_an_empty_held_poll_is_picked_up_at_once():
    """The SDK sleeps 1 s after every empty stop poll: a stop requested in that second waited for it
    (3 of 8 H200 runs picked a stop up 0.56-0.99 s late, the emulator holding empty polls 2 s)."""
    async def scenario():
        platform = FakePlatform()
        empty_answers: List[float] = []

        async def held_stop_poll(session):  # RunPod's long-poll: held (longer than the 1 s floor), then empty
            try:
                return [await asyncio.wait_for(platform.stops.get(), 1.2)]
            except asyncio.TimeoutError:
                empty_answers.append(time.monotonic())
                return []

        platform.stop_signals = held_stop_poll
        task = await start_loop(platform, 2)
        ids = platform.submit(1)
        await wait_until(lambda: platform.running == 1 and empty_answers, 5, "an empty poll answered")
        await asyncio.sleep(0.05)  # the SDK is in its 1 s pause now
        requested_at = time.monotonic()
        await platform.stops.put(ids[0])
        await wait_until(lambda: platform.ended.get(ids[0]) == "stopped", 5, "the job stopped")
        picked_up_s = time.monotonic() - requested_at
        await shut_down(platform, task)
        return picked_up_s

    picked_up_s = asyncio.run(scenario())
    print(f"stop picked up {1000 * picked_up_s:.1f} ms after it was requested")
    assert picked_up_s < PROMPT_S


def test_empty_stop_polls_answered_at_once_are_still_a_second_apart():
    async def scenario():
        platform = FakePlatform()
        polls: List[float] = []

        async def instant_stop_poll(session):  # a server that does not hold the poll
            polls.append(time.monotonic())
            return []

        platform.stop_signals = instant_stop_poll
        task = await start_loop(platform, 2)
        await asyncio.sleep(2.5)
        await shut_down(platform, task)
        return polls

    polls = asyncio.run(scenario())
    assert 2 <= len(polls) <= 3, polls  # no busy spin
    assert all(b - a >= 0.95 for a, b in zip(polls, polls[1:])), polls


def test_jobs_draining_after_sigterm_can_still_be_stopped():
    async def scenario():
        platform = FakePlatform(hold_s=0.05)
        task = await start_loop(platform, 4)
        ids = platform.submit(3)
        await wait_until(lambda: platform.running == 3, 5, "3 jobs running")
        platform.loop.handle_shutdown(signal.SIGTERM, None)
        for job_id in ids[:2]:  # the SDK stopped polling after the poll in flight at SIGTERM
            await platform.stops.put(job_id)
            await wait_until(lambda: platform.ended.get(job_id) == "stopped", 5, f"{job_id} stopped while draining")
        assert not task.done()
        await end_jobs(platform, ids[2:], 3)
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())


def test_sigterm_does_not_wait_out_a_held_stop_poll_once_drained():
    """The SDK returned only once its last stop poll did: held open by the server, that delayed the exit."""
    async def scenario():
        platform = FakePlatform(hold_s=0.05)
        task = await start_loop(platform, 4)
        ids = platform.submit(2)
        await wait_until(lambda: platform.running == 2, 5, "2 jobs running")
        platform.loop.handle_shutdown(signal.SIGTERM, None)
        await asyncio.sleep(0.2)
        assert not task.done()
        await end_jobs(platform, ids, 2)
        ended_at = time.monotonic()
        await asyncio.wait_for(task, 5)  # the stop poll is still held open (FakePlatform.stop_signals)
        return time.monotonic() - ended_at

    exit_s = asyncio.run(scenario())
    assert exit_s < PROMPT_S


def test_jobs_go_through_the_workers_result_path_where_it_serves_the_config():
    from gams_worker.platform.poster import ResultPoster
    from runpod.serverless.modules import rp_job

    async def handler(job):
        yield {}

    async def scenario():
        lean = JobLoop({"handler": handler, "return_aggregate_stream": True})
        sdk = JobLoop({"handler": handler, "refresh_worker": True})
        return lean.jobs_handler, sdk.jobs_handler

    lean, sdk = asyncio.run(scenario())
    assert getattr(lean, "__self__", None).__class__ is ResultPoster
    assert sdk is rp_job.handle_job


# --------------------------------------------------------------------------- takes the SDK could not parse
def test_a_take_too_deep_for_json_fails_its_jobs_instead_of_dropping_them():
    import handler as handler_module
    from gams_worker.platform.job_loop import read_take

    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(RecursionError):  # what the SDK's take meets, and drops the take for
        json.loads(deep)
    batch = f'[{{"input": {deep}, "id": "job-a"}}, {{"id": "job-b", "input": {{"prompt": "a\\"}}"}}}}]'
    jobs = asyncio.run(read_take(batch))
    assert [job["id"] for job in jobs] == ["job-a", "job-b"]
    assert all("nests deeper" in job.why for job in jobs)

    async def outputs(job):
        return [output async for output in handler_module.handler(job)]

    (output,) = asyncio.run(outputs(jobs[0]))
    error = json.loads(output["error"])
    assert error["type"] == "invalid_input" and error["field"] == "input" and "nests deeper" in error["message"]
    (job,) = asyncio.run(read_take('{"id": "job-c", "input": {"prompt": "a",}}'))  # not JSON: the SDK drops it
    assert job["id"] == "job-c" and "not valid JSON" in job.why


def test_a_take_that_parses_is_the_sdks_jobs_and_jobs_without_an_id_are_left_out():
    from gams_worker.platform.job_loop import job_ids_in, read_take

    assert asyncio.run(read_take('{"id": "j1", "input": {"prompt": "a"}}')) == [{"id": "j1", "input": {"prompt": "a"}}]
    assert asyncio.run(read_take('[{"id": "j1", "input": 1}, {"input": 2}, 3]')) == [{"id": "j1", "input": 1}]
    assert asyncio.run(read_take("[]")) is None
    # Only the jobs' own ids, wherever they stand and whatever their inputs hold.
    text = '[{"input": {"id": "not-me", "x": ["id", {"id": "nor-me"}]}, "id": "j\\u00e9"}, {"id": "j2"}]'
    assert job_ids_in(text) == ["j\u00e9", "j2"]
    assert job_ids_in('{"id": 5, "input": {}}') == []


def test_the_job_loop_takes_through_read_take_unless_the_sdk_config_replaces_the_take():
    from gams_worker.platform.job_loop import take_jobs

    assert JobLoop({"handler": None}).jobs_fetcher is take_jobs
    platform = FakePlatform()
    assert JobLoop(platform.config(1)).jobs_fetcher == platform.take


# --------------------------------------------------------------------------- the SDK-version guard
def test_guard_passes_the_release_the_loop_was_written_for():
    check_sdk_version()  # the installed runpod
    check_sdk_version(SDK_VERSION)


def test_guard_refuses_another_release_naming_both_versions():
    with pytest.raises(SdkVersionError) as raised:
        check_sdk_version("1.13.0")
    message = str(raised.value)
    assert "runpod 1.13.0 is installed" in message and f"runpod=={SDK_VERSION}" in message
    assert "job_loop.py" in message


def test_install_refuses_another_release_and_leaves_the_sdk_loop_alone(monkeypatch):
    monkeypatch.setattr(sdk_version.metadata, "version", lambda name: "1.12.1")
    monkeypatch.setattr(rp_scale, "JobScaler", rp_scale.JobScaler)  # restored after the test
    original = rp_scale.JobScaler
    with pytest.raises(SdkVersionError, match="runpod 1.12.1"):
        install_job_loop()
    assert rp_scale.JobScaler is original
    monkeypatch.undo()
    monkeypatch.setattr(rp_scale, "JobScaler", rp_scale.JobScaler)
    install_job_loop()
    assert rp_scale.JobScaler is job_loop.JobLoop


def test_worker_refuses_to_start_on_another_sdk_release(tmp_path):
    """`python handler.py` with runpod's metadata saying 1.13.0: exits 1 before any engine starts."""
    dist_info = tmp_path / "runpod-1.13.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: runpod\nVersion: 1.13.0\n")
    env = subprocess_env(
        PYTHONPATH=str(tmp_path),  # found before site-packages: importlib.metadata reads 1.13.0
        MODEL_NAME=str(tmp_path / "no-model"),
        RUNPOD_WEBHOOK_GET_JOB="http://127.0.0.1:9/v2/e/job-take/$ID?gpu=x",  # on the platform
        RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="true")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "handler.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "runpod 1.13.0 is installed" in proc.stderr and f"runpod=={SDK_VERSION}" in proc.stderr, proc.stderr
    assert "vllm" not in proc.stderr.lower(), "an engine was started before the version was checked"
    print(f"refused in {took:.1f} s")
