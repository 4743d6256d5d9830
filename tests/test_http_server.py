"""The load-balancing endpoint's HTTP server (gams_worker/platform/http.py) over real HTTP, on a stand-in
worker: health through a start and an engine's death, the request deadline, a separate health port."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import requests

from gams_worker.config import load_config
from gams_worker.platform.http import HttpEndpoint
from tests.harness.worker_process import ROOT, free_port, subprocess_env


class StandInWorker:
    """Answers each job after ``delay_s``: one dict, or SSE events when the body asks for a stream."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.engine = SimpleNamespace(errored=False)

    async def run(self, job):
        stream = job["input"].get("openai_input", {}).get("stream")
        if stream:
            yield 'data: {"choices": []}\n\n'
        await asyncio.sleep(self.delay_s)
        yield 'data: [DONE]\n\n' if stream else {"object": "list", "data": []}


@pytest.fixture
def endpoint():
    port, health_port = free_port(), free_port()
    config = load_config({"PORT": str(port), "PORT_HEALTH": str(health_port), "REQUEST_TIMEOUT_S": "1"})
    server = HttpEndpoint(config)
    server.urls = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{health_port}/ping"
    yield server
    server._loop.call_soon_threadsafe(server._drain)
    server._drained.wait(30)


def test_health_is_204_while_starting_200_when_ready_503_once_the_engine_is_dead(endpoint):
    url, ping = endpoint.urls
    assert requests.get(ping, timeout=10).status_code == 204
    starting = requests.post(f"{url}/v1/completions", json={"prompt": "a"}, timeout=10)
    assert starting.status_code == 503 and starting.json()["error"]["code"] == 503
    endpoint.worker = StandInWorker(0)
    assert requests.get(ping, timeout=10).status_code == 200
    endpoint.worker.engine.errored = True
    assert requests.get(ping, timeout=10).status_code == 503


def test_the_deadline_ends_a_whole_answer_with_504_and_a_stream_with_an_error_event(endpoint):
    url, _ = endpoint.urls
    endpoint.worker = StandInWorker(30)
    whole = requests.post(f"{url}/v1/completions", json={"prompt": "a"}, timeout=60)
    assert whole.status_code == 504 and "REQUEST_TIMEOUT_S" in whole.json()["error"]["message"]
    stream = requests.post(f"{url}/v1/completions", json={"prompt": "a", "stream": True}, timeout=60)
    events = [line for line in stream.text.split("\n\n") if line]
    assert stream.status_code == 200 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == 504


def test_the_server_stops_once_drained(endpoint):
    url, _ = endpoint.urls
    endpoint.worker = StandInWorker(0)
    endpoint._loop.call_soon_threadsafe(endpoint._drain)
    assert endpoint._drained.wait(30)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v1/models", timeout=10)


def test_a_taken_port_ends_the_worker_with_one_line_and_exit_1():
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, str(ROOT / "handler.py")], env=subprocess_env(PORT=str(port)),
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"gams-worker: cannot serve HTTP on port {port}:")
