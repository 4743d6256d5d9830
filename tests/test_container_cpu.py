"""The worker as a container: the CPU image from the same Dockerfile, run with podman, no network.

The image is the GPU image's Dockerfile with a Debian base, the CPU test environment's lock
(requirements-cpu.lock: vLLM's CPU build) and the tiny model baked by the bake stage from the
local fake hub. Each container runs in a network namespace with only a loopback device, where
the RunPod emulator (tests/harness/runpod_emulator.py) listens: the worker reaches it and
nothing else. One container serves these tests in order (engine starts cost ~30 s here):
jobs stream; a stop frees the job; SIGKILL, then the same container started again takes the
next job; SIGTERM while serving lets the job in flight finish; SIGTERM during the engine start
of another start exits within 5 s. Last, a second container of the same image started as a RunPod
load-balancing endpoint (PORT set, no job-queue variables): /ping 204 then 200, the official
``openai`` client over HTTP, SIGTERM exits 0. Figures print under ``pytest -s``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import openai
import pytest
import requests

from tests.harness.containers import CPU_IMAGE, TINY_REPO, Container, build_cpu_image, in_netns, loopback_netns, \
    require_podman
from tests.harness.runpod_emulator import RunPodEmulator

pytestmark = [pytest.mark.container, pytest.mark.engine]

START_TIMEOUT_S = 300  # import + eager engine start in the container, beside other work on 2 cores
STATUS_PORT = 8765  # inside the container's own network namespace
HTTP_PORT = 8080  # the load-balancing endpoint's PORT, in the same namespace
SLOVENE = "Kaj je vredno videti v Ljubljani? Čebele, šolske žlice in žganci"


def greedy(max_tokens: int) -> Dict[str, Any]:
    return {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}


def wait_until(condition, timeout: float, what: str, container: Container, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{container.tail()}")
        time.sleep(step)


class Stage:
    """The emulator and one worker container, both in one loopback-only network namespace."""

    def __init__(self, netns, emulator: RunPodEmulator, container: Container):
        self.netns = netns
        self.emulator = emulator
        self.container = container

    def status(self) -> Dict[str, Any]:
        url = f"http://127.0.0.1:{STATUS_PORT}/status"
        return in_netns(self.netns, lambda: requests.get(url, timeout=5).json())

    def wait_for_take(self, since: int) -> Dict[str, str]:
        """The query of the worker's first job-take after ``since`` earlier ones."""
        emulator = self.emulator

        def taken():
            if not self.container.running():
                raise AssertionError(f"the container exited ({self.container.exit_code()})\n{self.container.tail()}")
            return len(emulator.takes) > since

        wait_until(taken, START_TIMEOUT_S, "the worker's first job-take", self.container)
        return emulator.takes[since][1]

    def serving(self) -> None:
        """A serving worker, even where the test before this one failed after stopping it."""
        if not self.container.running():
            takes_before = len(self.emulator.takes)
            self.container.restart()
            self.wait_for_take(takes_before)

    def stopped(self) -> None:
        """A stopped container, even where the test before this one failed before stopping it."""
        if self.container.running():
            self.container.signal("KILL")
            self.container.wait(60)


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    require_podman()
    log_path = tmp_path_factory.mktemp("cpu-image") / "build.log"
    seconds = build_cpu_image(log_path)
    print(f"\n[container] CPU image built in {seconds:.0f} s; log {log_path}", file=sys.stderr)
    with loopback_netns() as netns:
        emulator = RunPodEmulator(hold_s=1.0, stop_hold_s=2.0)
        in_netns(netns, emulator.start)  # its server thread, and so its socket, live in netns
        env = {
            **emulator.worker_env(),
            "MAX_MODEL_LEN": "4096",
            "GPU_MEMORY_UTILIZATION": "0.05",  # on CPU: a share of the RAM for the KV cache
            "MAX_CONCURRENCY": "4",
            # Eager: torch.compile would add 10-30 s to each of the three engine starts here,
            # and compiled graphs are not what these tests are about.
            "ENFORCE_EAGER": "true",
            "WORKER_STATUS_PORT": str(STATUS_PORT),
        }
        container = Container(CPU_IMAGE, env, netns)
        try:
            started = time.monotonic()
            stage = Stage(netns, emulator, container)
            stage.wait_for_take(0)
            print(f"\n[container] first job-take {time.monotonic() - started:.0f} s after podman run",
                  file=sys.stderr)
            yield stage
        finally:
            container.remove()
            emulator.close()


def test_the_baked_model_is_served_with_the_hub_offline(stage):
    log = stage.container.logs()
    assert f"model {TINY_REPO}: using the baked copy at /models/" in log, stage.container.tail()
    # The worker sets them for vLLM's engine process, spawned after the model was resolved (the
    # image itself sets neither): read that process's environment.
    engine_environments = stage.container.exec("python", "-c", ENGINE_ENVIRONMENTS).stdout.strip().splitlines()
    assert engine_environments, stage.container.tail()
    for line in engine_environments:
        variables = line.split("\0")
        assert "HF_HUB_OFFLINE=1" in variables and "TRANSFORMERS_OFFLINE=1" in variables, variables


def test_the_images_model_info_spares_vllm_its_inspection_subprocess(stage):
    # The image's build step (builder/seed_model_info.py) wrote it; the worker copied it into its
    # new compile cache folder; vLLM, finding it valid, did not write it again.
    log = stage.container.logs()
    assert "vLLM's model info (vllm-model_executor-models-gemma2-Gemma2ForCausalLM.json" in log, stage.container.tail()
    seeded = stage.container.exec("python", "-c", SEEDED_FILE_UNCHANGED).stdout.strip()
    assert seeded == "unchanged", seeded


# The Gemma 2 model-info file in the worker's compile cache has the seed's bytes and date.
SEEDED_FILE_UNCHANGED = """
import glob, os
name = "vllm-model_executor-models-gemma2-Gemma2ForCausalLM.json"
seed = "/opt/gams-worker/model-info/modelinfos/" + name
copies = glob.glob(os.path.expanduser("~/.cache/gams-worker/compile-cache/**/modelinfos/" + name), recursive=True)
same = [c for c in copies if open(c).read() == open(seed).read() and os.stat(c).st_mtime == os.stat(seed).st_mtime]
print("unchanged" if copies and same == copies else f"seed {seed}, copies {copies}, unchanged {same}")
"""


# The environment of each process in the container whose command line names vLLM's EngineCore.
ENGINE_ENVIRONMENTS = """
import glob, os
for proc in glob.glob("/proc/[0-9]*"):
    if proc == f"/proc/{os.getpid()}":  # this script's command line names them too
        continue
    try:
        cmdline, environ = open(proc + "/cmdline", "rb").read(), open(proc + "/environ", "rb").read()
    except OSError:
        continue
    if b"EngineCore" in cmdline or b"spawn_main" in cmdline:
        print(environ.decode(errors="replace").replace("\\n", " "))
"""


def test_jobs_stream(stage):
    emulator = stage.emulator
    job_ids = [emulator.submit({"prompt": f"{SLOVENE} {i}", "sampling_params": greedy(48), "stream": True})
               for i in range(3)]
    for job_id in job_ids:
        record = emulator.wait_result(job_id, 120)
        outputs = record.result["output"]
        assert len(record.chunks) >= 3, record.chunks
        assert record.chunk_outputs == outputs  # every chunk posted once, in order
        assert outputs[-1]["usage"]["completion_tokens"] == 48
        assert "".join(c["text"] for o in outputs for c in o["choices"])


def test_a_stop_frees_the_job(stage):
    emulator = stage.emulator
    long_id = "container-job-to-stop"
    # Its posts wait for the stop, so the stop finds the job still generating (see test_platform.py).
    emulator.hold_stream_posts(long_id)
    emulator.submit({"prompt": SLOVENE, "sampling_params": greedy(3500), "stream": True}, job_id=long_id)
    wait_until(lambda: stage.status()["engine_requests"] == 1, 60, "the job generating", stage.container)
    emulator.stop_job(long_id)
    wait_until(lambda: emulator.jobs[long_id].stop_delivered_at is not None, 60, "stop delivered", stage.container)
    wait_until(lambda: stage.status()["engine_requests"] == 0, 60, "the engine request aborted", stage.container)
    assert emulator.jobs[long_id].results == []  # the SDK posts nothing for a stopped job
    record = emulator.wait_result(emulator.submit({"prompt": "Živjo", "sampling_params": greedy(8)}), 60)
    assert record.result["output"][-1]["usage"]["completion_tokens"] == 8


def test_a_restarted_container_takes_the_next_job(stage):
    stage.serving()
    emulator, container = stage.emulator, stage.container
    in_flight = "container-job-killed"
    # Killed while in flight: its posts are held, so its result cannot be posted before the kill
    # however fast the engine is (the tiny model can finish 3500 tokens within seconds).
    emulator.hold_stream_posts(in_flight)
    emulator.submit({"prompt": SLOVENE, "sampling_params": greedy(3500), "stream": True}, job_id=in_flight)
    emulator.wait_chunks(in_flight, 1, 120)
    container.signal("KILL")  # as RunPod kills a worker: no clean-up of any kind
    assert container.wait(60) == 137
    emulator.release_stream_posts(in_flight)
    assert emulator.jobs[in_flight].results == []
    takes_before = len(emulator.takes)
    started = time.monotonic()
    container.restart()  # the same writable layer: whatever the SDK left in /app is still there
    first_take = stage.wait_for_take(takes_before)
    print(f"\n[container] restarted container's first job-take after {time.monotonic() - started:.0f} s",
          file=sys.stderr)
    # runpod 1.10.0 reloaded the killed job from .runpod_jobs.pkl and never took another one.
    assert first_take["job_in_progress"] == "0"
    record = emulator.wait_result(emulator.submit({"prompt": "Živjo", "sampling_params": greedy(8)}), 120)
    assert record.result["output"][-1]["usage"]["completion_tokens"] == 8
    # Nothing of the killed job after the restart: it is neither replayed nor finished by the new worker.
    assert emulator.jobs[in_flight].results == []


def test_sigterm_while_serving_lets_the_job_in_flight_finish(stage):
    stage.serving()
    emulator, container = stage.emulator, stage.container
    job_id = "container-job-drained"
    # In flight when the signal goes, however fast the engine is: its posts are held till then,
    # so its result cannot have been posted.
    emulator.hold_stream_posts(job_id)
    emulator.submit({"prompt": SLOVENE, "sampling_params": greedy(3500), "stream": True}, job_id=job_id)
    emulator.wait_chunks(job_id, 1, 120)
    sent_at = time.monotonic()
    container.signal("TERM")
    emulator.release_stream_posts(job_id)
    exit_code = container.wait(180)
    record = emulator.jobs[job_id]
    print(f"\n[container] SIGTERM while serving: exit {exit_code} after {time.monotonic() - sent_at:.1f} s; "
          f"the job in flight {'finished' if record.results else 'was LOST'}", file=sys.stderr)
    assert exit_code == 0, container.tail()
    assert record.results and record.results[0][0] > sent_at  # in flight at SIGTERM, and finished
    assert record.result["output"][-1]["usage"]["completion_tokens"] == 3500
    assert record.chunk_outputs == record.result["output"]


def test_sigterm_during_engine_start_exits_within_5s(stage):
    container = stage.container
    stage.stopped()
    lines_before = len(container.logs().splitlines())
    container.restart()
    # In the engine start: the worker has said so, and vLLM's engine process is running.
    wait_until(lambda: any("starting vLLM engine in" in line for line in container.logs().splitlines()[lines_before:])
               and container.exec("python", "-c", ENGINE_ENVIRONMENTS).stdout.strip(),
               120, "the engine start", container, step=0.2)
    sent_at = time.monotonic()
    container.signal("TERM")
    exit_code = container.wait(30)
    exit_s = time.monotonic() - sent_at
    print(f"\n[container] SIGTERM during the engine start: exit {exit_code} after {exit_s:.1f} s", file=sys.stderr)
    # podman may record the exit before its log holds the last line the worker wrote.
    wait_until(lambda: "gams-worker: SIGTERM during start-up: stopping" in container.logs(), 60,
               "the start-up's stop line in the log", container)
    assert exit_code == 143, container.tail()
    assert exit_s < 5, container.tail()


def ping(netns) -> Optional[int]:
    try:
        return in_netns(netns, lambda: requests.get(f"http://127.0.0.1:{HTTP_PORT}/ping", timeout=5).status_code)
    except requests.ConnectionError:  # not listening yet
        return None


def chat_over_http() -> Tuple[List[str], str, List[str]]:
    """The served models, and one streamed chat answer's deltas and finish reason, by the openai client."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key="unused", max_retries=0)
    models = [model.id for model in client.models.list().data]
    stream = client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": SLOVENE}],
                                            max_tokens=12, temperature=0, stream=True)
    chunks = [chunk for chunk in stream if chunk.choices]
    deltas = [chunk.choices[0].delta.content or "" for chunk in chunks]
    return models, chunks[-1].choices[0].finish_reason, deltas


def test_the_same_image_serves_a_load_balancing_endpoint(stage):
    stage.stopped()  # the queue worker's cores go to this one
    env = {"PORT": str(HTTP_PORT), "MAX_MODEL_LEN": "4096", "GPU_MEMORY_UTILIZATION": "0.05",
           "MAX_CONCURRENCY": "4", "ENFORCE_EAGER": "true"}  # and none of RunPod's job-queue variables
    container = Container(CPU_IMAGE, env, stage.netns, name_prefix="gams-test-lb")
    try:
        started = time.monotonic()
        pings: List[int] = []
        wait_until(lambda: pings.append(ping(stage.netns)) or pings[-1] == 200, START_TIMEOUT_S, "/ping 200",
                   container, step=0.2)
        answers = [code for code in pings if code is not None]
        print(f"\n[container] load-balancing endpoint: first /ping answer after {len(pings) - len(answers)} "
              f"refused polls, 200 after {time.monotonic() - started:.0f} s", file=sys.stderr)
        assert answers[0] == 204 and set(answers) == {204, 200}, answers  # starting, then ready
        models, finish_reason, deltas = in_netns(stage.netns, chat_over_http)
        assert models == [TINY_REPO]
        assert finish_reason in ("length", "stop") and len(deltas) > 1 and "".join(deltas), deltas
        container.signal("TERM")
        assert container.wait(120) == 0, container.tail()
    finally:
        container.remove()
