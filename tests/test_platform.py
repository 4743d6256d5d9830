"""The worker as RunPod runs it: `python handler.py` as a subprocess, the real runpod SDK job
loop, and a local emulator of RunPod's worker API (tests/harness/runpod_emulator.py) over real HTTP.

Engine starts are the cost here, so one worker serves most tests of this module (the
``platform`` fixture, torn down by the engine-core kill test); the restart, SIGTERM and
``--rp_serve_api`` tests each need their own process. Figures print under ``pytest -s``.
"""

from __future__ import annotations

import collections
import json
import random
import re
import signal
import time
from typing import Any, Dict, List

import pytest
import requests

from tests.harness.runpod_emulator import RunPodEmulator
from tests.harness.worker_process import (
    ROOT,
    START_TIMEOUT_S,
    WorkerProcess,
    engine_env,
    exit_noise,
    free_port,
    start_platform_worker,
    subprocess_env,
    wait_for_first_take,
    wait_until,
)

HF_TOKEN_CANARY = "hf_canary_7f3c9b2e41d84a6b"
SLOVENE = "Kaj je vredno videti v Ljubljani? Čebele, šolske žlice in žganci"


def greedy(max_tokens: int, **extra: Any) -> Dict[str, Any]:
    return {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, **extra}


def texts(outputs: List[Dict[str, Any]], index: int = 0) -> str:
    return "".join(c["text"] for o in outputs for c in o["choices"] if c["index"] == index)


def job_error(record) -> Dict[str, Any]:
    """The structured error of a failed job, as RunPod received it: JSON text."""
    assert record.result is not None and "error" in record.result, record.result
    error = json.loads(record.result["error"])
    assert isinstance(error, dict), record.result
    return error


class Platform:
    def __init__(self, emulator: RunPodEmulator, worker: WorkerProcess, status_port: int):
        self.emulator = emulator
        self.worker = worker
        self.status_port = status_port

    def status(self) -> Dict[str, Any]:
        return requests.get(f"http://127.0.0.1:{self.status_port}/status", timeout=5).json()

    def wait_engine_requests(self, count: int, timeout: float, step: float = 0.05) -> None:
        seen: List[Dict[str, Any]] = []
        try:
            wait_until(lambda: seen.append(self.status()) or seen[-1]["engine_requests"] == count, timeout,
                       f"{count} engine requests", self.worker, step=step)
        except AssertionError as exc:
            raise AssertionError(f"statuses seen last: {seen[-3:]}\n{exc}") from None

    def run(self, job_input: Dict[str, Any], timeout: float = 120):
        job_id = self.emulator.submit(job_input)
        return self.emulator.wait_result(job_id, timeout)


# Worker A's stream POST budget: low enough that a burst of 64 on this CPU is held by it, high enough
# that a few streams (the other tests) keep the cadence of one (3 streams: a flush at most every 0.3 s).
POSTS_PER_SECOND = 10


@pytest.fixture(scope="module")
def platform(tiny_model_dir, tmp_path_factory):
    """Worker A: concurrency 64, status endpoint on, a canary HF_TOKEN in its environment."""
    emulator = RunPodEmulator(hold_s=1.0)
    emulator.start()
    status_port = free_port()
    cwd = tmp_path_factory.mktemp("worker-a")
    worker = start_platform_worker(emulator, tiny_model_dir, cwd, "worker-a", MAX_CONCURRENCY="64", MAX_MODEL_LEN="8192",
                                   WORKER_STATUS_PORT=str(status_port), HF_TOKEN=HF_TOKEN_CANARY,
                                   STREAM_POSTS_PER_SECOND=str(POSTS_PER_SECOND))
    wait_for_first_take(emulator, worker)
    yield Platform(emulator, worker, status_port)
    worker.terminate(timeout=60)
    emulator.close()


@pytest.mark.engine
def test_the_worker_runs_the_pinned_runpod_sdk(platform):
    import runpod

    pinned = re.search(r"^runpod==(\S+)$", (ROOT / "requirements-runpod.txt").read_text(), re.M).group(1)
    assert runpod.__version__ == pinned == "1.12.0"
    assert f"Starting Serverless Worker |  Version {pinned} ---" in platform.worker.stdout()
    # Pings carry the SDK version too.
    wait_until(lambda: platform.emulator.pings, 30, "a ping", platform.worker)
    assert platform.emulator.pings[0][1]["runpod_version"] == pinned


@pytest.mark.engine
def test_streamed_chunks_arrive_in_order_and_concatenate_to_the_aggregate(platform):
    # Long enough to outlast several 100 ms flush windows however fast the engine runs: a quiet machine
    # generated 64 tokens in fewer deltas than the three chunks asserted below.
    streamed = platform.run({"prompt": SLOVENE, "sampling_params": greedy(1500), "stream": True})
    whole = platform.run({"prompt": SLOVENE, "sampling_params": greedy(1500), "stream": False})

    chunks = streamed.chunk_outputs
    aggregate = streamed.result["output"]
    assert len(chunks) >= 3, chunks
    assert chunks == aggregate  # every chunk posted, none twice, in order
    assert [t for t, _ in streamed.chunks] == sorted(t for t, _ in streamed.chunks)
    assert aggregate[-1]["usage"]["completion_tokens"] == 1500
    # The non-stream job returns one output, whose text is the streamed text in order.
    assert len(whole.result["output"]) == 1
    assert whole.result["output"][0]["choices"][0]["text"] == texts(chunks)
    assert len(streamed.results) == len(whole.results) == 1


@pytest.mark.engine
def test_a_burst_of_64_streams_posts_within_the_budget_and_every_text_arrives_whole(platform):
    """The flush policy under load (gams_worker/jobs/streaming.py), through the SDK loop and the emulator:
    the stream POSTs of 64 jobs streaming at once stay within STREAM_POSTS_PER_SECOND over the burst,
    beside each job's first and last chunk, and each job's chunks still make up its whole text."""
    from bench.cpu_suite import PROMPTS

    references = {prompt: texts(platform.run({"prompt": prompt, "sampling_params": greedy(128)}).result["output"])
                  for prompt in PROMPTS}
    records = platform.emulator.submit_many(
        [{"prompt": PROMPTS[i % len(PROMPTS)], "sampling_params": greedy(128), "stream": True} for i in range(64)])
    for record in records:
        platform.emulator.wait_result(record.id, 300)
    for i, record in enumerate(records):
        assert record.chunk_outputs == record.result["output"], record.id  # each chunk once, in order
        assert texts(record.chunk_outputs) == references[PROMPTS[i % len(PROMPTS)]], record.id
        assert record.result["output"][-1]["usage"]["completion_tokens"] == 128
    posts = sorted(t for record in records for t, _ in record.chunks)
    streaming_s = posts[-1] - posts[0]
    # First and last chunks are never held (one each per job); the rest share the budget. One post per
    # stream of slack: a stream's floor is computed with the streams flowing when it flushes.
    budget = POSTS_PER_SECOND * streaming_s + 64
    held = len(posts) - 2 * 64
    fixed_cadence = sum(-(-128 // 16) for _ in records)  # what 16-token chunks alone would have posted, at least
    print(f"\n[budget] 64 streams x 128 tokens: {len(posts)} stream POSTs in {streaming_s:.1f} s, "
          f"{held} beside first and last chunks, budget {POSTS_PER_SECOND}/s allows {budget:.0f}; "
          f"16-token chunks alone would have been >= {fixed_cadence}")
    assert held <= budget
    assert len(posts) < fixed_cadence  # the budget, not the cadence of a few streams, set the chunk size


def bad_job_inputs(count: int, seed: int) -> List[tuple]:
    """``count`` bad job inputs, each with the field its error must name."""
    rng = random.Random(seed)
    word = lambda: rng.choice(["Ljubljana", "čebela", "žganci", "šola", "x", "🙂"])  # noqa: E731
    makers = [
        lambda: ({}, "prompt"),
        lambda: ({"prompt": rng.choice([5, None, [], {}, ""])}, "prompt"),
        lambda: ({"prompt": word(), "messages": [{"role": "user", "content": word()}]}, "prompt"),
        lambda: ({"messages": rng.choice(["hi", [], 3])}, "messages"),
        lambda: ({"messages": [{"role": rng.choice(["robot", "", None]), "content": word()}]}, "messages[0].role"),
        lambda: ({"messages": [{"role": "user", "content": word(), "name": "x"}]}, "messages[0].name"),
        lambda: ({"prompt": word(), "sampling_params": {"max_tokens": rng.choice([0, -3, 1.5, "8", True])}},
                 "sampling_params.max_tokens"),
        lambda: ({"prompt": word(), "sampling_params": {"max_tokens": rng.randint(9000, 10**9)}},
                 "sampling_params.max_tokens"),
        lambda: ({"prompt": word(), "sampling_params": {"temperature": rng.choice(["hot", -1, 101])}},
                 "sampling_params.temperature"),
        lambda: ({"prompt": word(), "sampling_params": {"top_p": rng.choice([0, 1.5, "x"])}}, "sampling_params.top_p"),
        lambda: ({"prompt": word(), "sampling_params": {"n": rng.randint(17, 10**6)}}, "sampling_params.n"),
        lambda: ({"prompt": word(), "sampling_params": {"stop": ["x"] * rng.randint(17, 500)}},
                 "sampling_params.stop"),
        lambda: ({"prompt": word(), "sampling_params": {"stop": ["a", "b" * rng.randint(257, 5000)]}},
                 "sampling_params.stop[1]"),
        lambda: ({"prompt": word(), "sampling_params": {"temprature": 0.5}}, "sampling_params.temprature"),
        lambda: ({"prompt": word(), "stream": rng.choice(["yes", 1, None])}, "stream"),
        lambda: ({"prompt": word(), rng.choice(["mode", "model", "Prompt"]): 1}, None),  # unknown field names itself
        lambda: ({"prompt": "Ljubljana " * rng.randint(10000, 19000)}, "prompt"),  # tokens > MAX_MODEL_LEN=8192
        lambda: ({"prompt": "a" * rng.randint(200_001, 400_000)}, "prompt"),  # > MAX_PROMPT_CHARS
        lambda: ({"messages": [{"role": "user", "content": "x"}] * rng.randint(257, 400)}, "messages"),
        lambda: ({"prompt": word(), "sampling_params": {"seed": "x" * rng.randint(1_100_000, 1_200_000)}}, "input"),
        lambda: ({"messages": [{"role": "assistant", "content": word()}]}, "messages"),  # the template refuses
    ]
    out = []
    for i in range(count):
        job_input, field = makers[i % len(makers)]()
        if field is None:  # the unknown key is the field
            field = next(k for k in job_input if k != "prompt")
        out.append((job_input, field))
    rng.shuffle(out)
    return out


@pytest.mark.engine
def test_200_bad_jobs_get_errors_naming_their_field_then_a_good_job_succeeds(platform):
    bad = bad_job_inputs(200, seed=4)
    job_ids = [platform.emulator.submit(job_input) for job_input, _ in bad]
    good_id = platform.emulator.submit({"prompt": "Živjo", "sampling_params": greedy(6), "stream": True})
    fields = []
    for job_id, (_, field) in zip(job_ids, bad):
        record = platform.emulator.wait_result(job_id, 120)
        error = job_error(record)
        assert error["type"] == "invalid_input", error
        assert error["field"] == field, (error, field)
        assert error["message"]
        fields.append(field)
    good = platform.emulator.wait_result(good_id, 120)
    assert good.result["output"][-1]["usage"]["completion_tokens"] == 6
    assert platform.worker.alive()
    assert "Traceback" not in platform.worker.stderr()
    print(f"\n[bad input] {len(job_ids)} bad jobs, {len(set(fields))} distinct fields, all rejected by name; "
          "the good job after them succeeded")


@pytest.mark.engine
def test_job_errors_reach_clients_as_json_through_run_runsync_status_and_stream(platform):
    """Through the emulator's client job API, as a client of RunPod reads them."""
    api = f"{platform.emulator.base_url}/v2/{platform.emulator.endpoint_id}"
    plain = {"input": {"prompt": "Bled", "sampling_params": {"n": 500, "max_tokens": 400}}}
    expected = {"type": "invalid_input", "message": "has 500 choices; MAX_N allows at most 16",
                "field": "sampling_params.n"}
    runsync = requests.post(f"{api}/runsync", json=plain, timeout=120).json()
    assert runsync["status"] == "FAILED" and json.loads(runsync["error"]) == expected
    job_id = requests.post(f"{api}/run", json=plain, timeout=30).json()["id"]
    platform.emulator.wait_result(job_id, 120)
    status = requests.get(f"{api}/status/{job_id}", timeout=30).json()
    stream = requests.get(f"{api}/stream/{job_id}", timeout=30).json()
    assert status["status"] == stream["status"] == "FAILED"
    assert json.loads(status["error"]) == json.loads(stream["error"]) == expected
    assert stream["stream"] == []

    # The OpenAI dialect: OpenAI's error object; the same limit applies.
    openai_job = {"input": {"openai_route": "/v1/completions",
                            "openai_input": {"prompt": "Bled", "n": 500, "max_tokens": 400}}}
    runsync = requests.post(f"{api}/runsync", json=openai_job, timeout=120).json()
    assert runsync["status"] == "FAILED"
    assert json.loads(runsync["error"]) == {"message": "has 500 choices; MAX_N allows at most 16",
                                            "type": "BadRequestError", "param": "n", "code": 400}

    # A good job streams through the same API.
    job_id = requests.post(f"{api}/run", json={"input": {"prompt": SLOVENE, "sampling_params": greedy(24),
                                                          "stream": True}}, timeout=30).json()["id"]
    chunks: List[Any] = []
    while True:
        answer = requests.get(f"{api}/stream/{job_id}", timeout=30).json()
        chunks += [item["output"] for item in answer["stream"]]
        if answer["status"] == "COMPLETED":
            break
        assert answer["status"] in ("IN_QUEUE", "IN_PROGRESS"), answer
    assert chunks == requests.get(f"{api}/status/{job_id}", timeout=30).json()["output"]
    assert chunks[-1]["usage"]["completion_tokens"] == 24


@pytest.mark.engine
def test_stream_posts_answered_500_are_retried_and_the_job_completes(platform):
    reference = platform.run({"prompt": SLOVENE, "sampling_params": greedy(48)})
    platform.emulator.fail_stream_posts(2)
    record = platform.run({"prompt": SLOVENE, "sampling_params": greedy(48), "stream": True})
    assert platform.emulator.failed_stream_posts == 2
    assert record.chunk_outputs == record.result["output"]  # the retried chunk arrived once, in place
    assert texts(record.chunk_outputs) == reference.result["output"][0]["choices"][0]["text"]


@pytest.mark.engine
def test_stopping_a_stream_frees_its_engine_request_within_1s_while_others_stream(platform):
    emulator = platform.emulator
    idle = {"running_jobs": 0, "engine_requests": 0, "engine_errored": False}
    status = platform.status()
    assert {key: status[key] for key in idle} == idle  # nothing left over from earlier jobs
    # The tiny model is fast and the engine runs ahead of the posts: only very long jobs are
    # surely still generating when the stop comes. The stopped job's first post is left
    # unanswered, so the stop always finds its task waiting on the post and its generator
    # paused at ``yield`` (see gams_worker/jobs/dialects.py), not inside the engine loop.
    long_id = "job-to-stop"
    emulator.hold_stream_posts(long_id)
    emulator.submit({"prompt": SLOVENE, "sampling_params": greedy(8000), "stream": True}, job_id=long_id)
    other_ids = [emulator.submit({"prompt": f"{SLOVENE} {i}", "sampling_params": greedy(8000), "stream": True})
                 for i in range(2)]
    # Stop as soon as all three generate: waiting for posts would let the engine run ahead.
    platform.wait_engine_requests(3, 120)
    emulator.wait_chunks(long_id, 1, 30)
    other_chunks_before = {job_id: len(emulator.jobs[job_id].chunks) for job_id in other_ids}

    stopped_at = time.monotonic()
    emulator.stop_job(long_id)
    # Delivery waits on the SDK's stop long-poll (and its 1 s pause after an empty poll); on a
    # loaded CI machine that alone has taken seconds, so it gets its own generous bound.
    wait_until(lambda: emulator.jobs[long_id].stop_delivered_at is not None, 15, "stop delivered", platform.worker)
    aborted = wait_until(lambda: [a["at"] for a in platform.status()["aborted"] if a["job_id"] == long_id], 15,
                         "the stopped job's engine request aborted", platform.worker)
    status = platform.status()
    assert status["engine_requests"] <= 2 and status["running_jobs"] <= 2
    # The worker's part, stop handed over -> engine request aborted, timed where each happens
    # (emulator, worker): this process's own polling lagged by seconds on a loaded 2-core
    # machine. Both are time.monotonic(), one clock for all processes of a Linux host.
    delivered_at, aborted_at = emulator.jobs[long_id].stop_delivered_at, aborted[0]
    latency = aborted_at - delivered_at

    for job_id in other_ids:
        record = emulator.wait_result(job_id, 120)
        assert len(record.chunks) > other_chunks_before[job_id]  # kept streaming after the stop
        assert record.result["output"][-1]["choices"][0]["finish_reason"] == "length"
        assert record.result["output"][-1]["usage"]["completion_tokens"] == 8000
    stopped = emulator.jobs[long_id]
    assert stopped.results == []  # the SDK posts nothing for a stopped job
    # The SDK posts a job's chunks one at a time: only the post in flight when the job was
    # stopped may arrive after the abort, however late the emulator records it.
    chunks_after_abort = [t for t, _ in stopped.chunks if t > aborted_at]
    assert len(chunks_after_abort) <= 1, chunks_after_abort
    assert platform.status()["engine_requests"] == 0
    print(f"\n[cancel] stop delivered to the worker {(delivered_at - stopped_at) * 1000:.0f} ms after the "
          f"platform's stop; engine request aborted {latency * 1000:.0f} ms after delivery "
          f"(others streamed on: {[len(emulator.jobs[j].chunks) for j in other_ids]} chunks)")
    assert 0 < latency < 1.0


@pytest.mark.engine
def test_500_jobs_at_concurrency_64_complete_exactly_once(platform, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    emulator = platform.emulator
    words = ["Ljubljana", "čebela", "Triglav", "žganci", "šola", "Prešeren", "reka", "sonce"]

    def job_input(i: int) -> Dict[str, Any]:
        # Prompts differ in length and max_tokens in value, so a result given to the wrong
        # job shows in its token counts; same inputs must give the same (greedy) text.
        prompt = " ".join(words[: 1 + i % len(words)]) + " " + "in " * (i % 7)
        return {"prompt": prompt.strip(), "sampling_params": greedy(4 + i % 5), "stream": i % 2 == 0}

    inputs = {}
    started = time.monotonic()
    for i in range(50):
        inputs[emulator.submit(job_input(i), job_id=f"load-{i:03d}")] = job_input(i)
    for job_id in list(inputs):
        emulator.wait_result(job_id, 300)
    rss_after_50 = platform.worker.rss_mib()
    rss_all_after_50 = platform.worker.rss_mib(with_children=True)
    for i in range(50, 500):
        inputs[emulator.submit(job_input(i), job_id=f"load-{i:03d}")] = job_input(i)
    deadline = time.monotonic() + 600
    for job_id in inputs:
        emulator.wait_result(job_id, max(1.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - started
    time.sleep(2)  # a duplicate post would arrive now
    rss_after_500 = platform.worker.rss_mib()
    rss_all_after_500 = platform.worker.rss_mib(with_children=True)

    lost = [j for j in inputs if not emulator.jobs[j].results]
    duplicated = [j for j in inputs if len(emulator.jobs[j].results) > 1 or len(emulator.jobs[j].taken_at) > 1]
    texts_by_input: Dict[str, set] = {}
    for job_id, given in inputs.items():
        record = emulator.jobs[job_id]
        assert "error" not in record.result, (job_id, record.result)
        last = record.result["output"][-1]
        assert last["usage"]["completion_tokens"] == given["sampling_params"]["max_tokens"], job_id
        assert last["usage"]["prompt_tokens"] == len(tokenizer.encode(given["prompt"])), job_id
        if given["stream"]:
            assert record.chunk_outputs == record.result["output"], job_id
        text = texts(record.result["output"])
        texts_by_input.setdefault(json.dumps(given, sort_keys=True), set()).add(text)
    inconsistent = [k for k, v in texts_by_input.items() if len(v) != 1]
    growth = (rss_after_500 - rss_after_50) / rss_after_50
    growth_all = (rss_all_after_500 - rss_all_after_50) / rss_all_after_50
    print(f"\n[load] jobs=500 concurrency=64 completed={500 - len(lost)} lost={len(lost)} "
          f"duplicated={len(duplicated)} in {elapsed:.1f} s ({500 / elapsed:.1f} jobs/s); "
          f"worker RSS (main process) after 50: {rss_after_50:.0f} MiB, after 500: {rss_after_500:.0f} MiB "
          f"({growth:+.1%}); with children (engine core): {rss_all_after_50:.0f} -> {rss_all_after_500:.0f} MiB "
          f"({growth_all:+.1%})")
    assert lost == [] and duplicated == []
    assert inconsistent == []
    assert abs(growth) <= 0.10
    assert platform.status()["running_jobs"] == 0


@pytest.mark.engine
def test_killing_the_engine_core_makes_the_worker_exit_non_zero_within_5s(platform):
    """Ends worker A (keep this test after the others that use it)."""
    emulator = platform.emulator
    job_id = emulator.submit({"prompt": SLOVENE, "sampling_params": greedy(3500), "stream": True})
    emulator.wait_chunks(job_id, 1, 120)
    platform.worker.engine_core().kill()
    killed_at = time.monotonic()
    returncode = platform.worker.proc.wait(30)
    exit_s = time.monotonic() - killed_at
    print(f"\n[engine kill] worker exited with status {returncode} {exit_s:.2f} s after its engine core was killed")
    assert returncode != 0
    assert exit_s < 5.0
    # The in-flight job was told, not left hanging.
    error = job_error(emulator.wait_result(job_id, 1))
    assert error["type"] == "engine_dead", error


@pytest.mark.engine
def test_hf_token_never_reaches_logs_or_outputs_and_remote_code_is_off(platform):
    """Reads worker A's whole life: run after the tests above."""
    if platform.worker.alive():
        platform.worker.terminate(60)
    logs = platform.worker.stdout() + platform.worker.stderr()
    assert "trust_remote_code': False" in logs  # the engine kwargs line
    assert HF_TOKEN_CANARY not in logs
    records = json.dumps([(r.input, r.chunks, r.results) for r in platform.emulator.jobs.values()], ensure_ascii=False)
    assert HF_TOKEN_CANARY not in records
    assert HF_TOKEN_CANARY not in json.dumps([platform.emulator.takes, platform.emulator.pings])


@pytest.fixture(scope="module")
def restarted(tiny_model_dir, tmp_path_factory):
    """Worker X is killed with SIGKILL mid-job; worker Y starts fresh in the same directory."""
    emulator = RunPodEmulator(hold_s=1.0)
    emulator.start()
    cwd = tmp_path_factory.mktemp("worker-restart")
    x = start_platform_worker(emulator, tiny_model_dir, cwd, "worker-x", MAX_CONCURRENCY="1")
    wait_for_first_take(emulator, x)
    in_flight = "job-killed-in-flight"
    # Its posts are held, so it is still in flight at the kill however fast the engine is.
    emulator.hold_stream_posts(in_flight)
    emulator.submit({"prompt": SLOVENE, "sampling_params": greedy(3500), "stream": True}, job_id=in_flight)
    emulator.wait_chunks(in_flight, 1, 120)
    x.kill_group()  # as a container is killed: no clean-up of any kind
    emulator.release_stream_posts(in_flight)
    takes_before_y = len(emulator.takes)
    y = start_platform_worker(emulator, tiny_model_dir, cwd, "worker-y", MAX_CONCURRENCY="1")
    first_take = wait_for_first_take(emulator, y, since=takes_before_y)
    yield emulator, y, first_take, in_flight
    y.terminate(60)
    emulator.close()


@pytest.mark.engine
def test_a_fresh_worker_after_sigkill_takes_the_next_job(restarted):
    # runpod 1.10.0 would reload the killed job from .runpod_jobs.pkl, report it in
    # progress and, at concurrency 1, never take another job.
    emulator, y, first_take, killed_job = restarted
    assert first_take["job_in_progress"] == "0"
    record = emulator.wait_result(emulator.submit({"prompt": "Živjo", "sampling_params": greedy(8)}), 120)
    assert record.result["output"][-1]["usage"]["completion_tokens"] == 8
    assert emulator.jobs[killed_job].results == []


@pytest.mark.engine
def test_sigterm_lets_in_flight_jobs_finish_and_the_worker_exits_0(restarted):
    emulator, y, _, _ = restarted
    job_id = "job-in-flight-at-sigterm"
    # Its posts are held till the signal is sent, so it is in flight then however fast the engine is.
    emulator.hold_stream_posts(job_id)
    emulator.submit({"prompt": SLOVENE, "sampling_params": greedy(2000), "stream": True}, job_id=job_id)
    emulator.wait_chunks(job_id, 1, 120)
    sent_at = time.monotonic()
    y.proc.send_signal(signal.SIGTERM)
    emulator.release_stream_posts(job_id)
    returncode = y.proc.wait(120)
    exit_s = time.monotonic() - sent_at
    record = emulator.jobs[job_id]
    print(f"\n[sigterm] worker exited with status {returncode} {exit_s:.1f} s after SIGTERM; "
          f"the in-flight job {'finished' if record.results else 'was LOST'}")
    assert returncode == 0, y.tail()
    assert exit_noise(y.stdout(), y.stderr()) == []  # no traceback or leak report on the way out
    # Served, then a plain SIGTERM: nothing claims the start-up was interrupted (the SDK's heartbeat
    # process, forked from the worker and ended at its exit, said so before).
    assert "SIGTERM during start-up" not in y.stdout() + y.stderr(), y.tail()
    assert record.results[0][0] > sent_at  # the job was still in flight at SIGTERM, and finished
    assert record.result["output"][-1]["usage"]["completion_tokens"] == 2000
    assert record.chunk_outputs == record.result["output"]


@pytest.mark.engine
def test_rp_serve_api_serves_runsync_and_stream(tiny_model_dir, tmp_path):
    port = free_port()
    env = subprocess_env(**engine_env(tiny_model_dir, GPU_MEMORY_UTILIZATION="0.05"))
    worker = WorkerProcess(env, tmp_path, "serve-api",
                           args=("--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)))
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return requests.get(f"{base}/docs", timeout=2).status_code == 200
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or too busy to answer yet
                return False

        wait_until(up, START_TIMEOUT_S, "the API server", worker, step=0.5)
        job = {"input": {"prompt": SLOVENE, "sampling_params": greedy(24), "stream": True}}
        runsync = requests.post(f"{base}/runsync", json=job, timeout=120).json()
        assert runsync["status"] == "COMPLETED", runsync
        assert runsync["output"][-1]["usage"]["completion_tokens"] == 24

        job_id = requests.post(f"{base}/run", json=job, timeout=30).json()["id"]
        stream = requests.post(f"{base}/stream/{job_id}", timeout=120).json()  # the SDK serves it as POST
        assert stream["status"] == "COMPLETED", stream
        outputs = [item["output"] for item in stream["stream"]]
        assert texts(outputs) == texts(runsync["output"])

        bad = requests.post(f"{base}/runsync", json={"input": {"prompt": ""}}, timeout=30).json()
        (output,) = bad["output"]  # the SDK's test server lists what the handler yielded
        assert json.loads(output["error"]) == {"type": "invalid_input", "message": "must be a non-empty string",
                                               "field": "prompt"}
    finally:
        worker.terminate(60)


# ---------------------------------------------------------------- unit tests, no engine
class FakeService:
    """Yields outputs until closed; records when its ``finally`` ran (where the real one aborts)."""

    def __init__(self):
        self.closed_at = None
        self.aborted = collections.deque()
        self.engine = type("Engine", (), {"errored": False})()

    async def run(self, job):
        import asyncio

        try:
            for i in range(1000):
                await asyncio.sleep(0.001)
                yield {"choices": [{"index": 0, "text": str(i)}]}
        finally:
            self.closed_at = time.monotonic()


def test_a_cancelled_job_task_closes_the_service_generator_at_once(monkeypatch):
    """The SDK cancels a stopped job's task, often while it posts a chunk: the generators are
    paused at ``yield`` and, in the SDK, stay referenced for seconds (measured end to end: the
    engine request outlived the stop by > 5 s). The handler must close them at once anyway."""
    import asyncio

    import handler as handler_module
    from gams_worker.jobs.dialects import JobDispatch

    service = FakeService()
    jobs = JobDispatch(service, openai=None)
    monkeypatch.setattr(handler_module, "worker", jobs)  # what the handler runs jobs on
    posting = asyncio.Event()
    still_referenced = []  # as the SDK's frames and task keep the generator alive

    async def job_task():  # the SDK's loop: take an output, then post it over HTTP
        outputs = handler_module.handler({"id": "j", "input": {}})
        still_referenced.append(outputs)
        async for _ in outputs:
            posting.set()
            await asyncio.sleep(3600)

    async def scenario():
        task = asyncio.ensure_future(job_task())
        await posting.wait()
        cancelled_at = time.monotonic()
        task.cancel()
        for _ in range(100):
            if service.closed_at is not None:
                break
            await asyncio.sleep(0.01)
        return cancelled_at, task

    cancelled_at, task = asyncio.run(scenario())
    assert task.cancelled()
    assert service.closed_at is not None and service.closed_at - cancelled_at < 0.5
    assert jobs.running_jobs == 0


def test_status_endpoint_reports_the_job_counters():
    from gams_worker.jobs.dialects import JobDispatch
    from gams_worker.serving.status import StatusServer, worker_status

    service = FakeService()
    jobs = JobDispatch(service, openai=None)
    jobs.running_jobs = 3
    service.aborted.append(("job-1", 12.5))
    # As the Worker wires it (gams_worker/worker.py): the router's count, the engine, the plain jobs' aborts.
    server = StatusServer(lambda: worker_status(service.engine, jobs.running_jobs, service.aborted), free_port())
    try:
        body = requests.get(f"http://127.0.0.1:{server.port}/status", timeout=5).json()
        assert body == {"running_jobs": 3, "engine_requests": None, "engine_errored": False,
                        "aborted": [{"job_id": "job-1", "at": 12.5}]}
        assert requests.get(f"http://127.0.0.1:{server.port}/other", timeout=5).status_code == 404
    finally:
        server.close()
