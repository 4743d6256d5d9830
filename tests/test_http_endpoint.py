"""The worker as a load-balancing endpoint: `python handler.py` with PORT set serves /ping and the OpenAI
routes over real HTTP, read with the official openai client. One worker process serves the module (engine
starts are the cost); the last test drains it with SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
from typing import Any, Dict, List

import openai
import pytest
import requests
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.harness.openai_samples import QUESTION
from tests.harness.worker_process import (
    START_TIMEOUT_S, WorkerProcess, engine_env, free_port, subprocess_env, wait_until,
)

pytestmark = pytest.mark.engine
API_KEY = "sk-http-canary-5c1e0a7d"
WAIT_S = 120  # generous: the engine shares 2 cores with other work


class Endpoint:
    def __init__(self, worker: WorkerProcess, port: int, status_port: int, pings: List[int]):
        self.worker = worker
        self.url = f"http://127.0.0.1:{port}"
        self.status_port = status_port
        self.pings = pings  # the /ping answers seen from process start to ready
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=WAIT_S)
        self.model = self.client.models.list().data[0].id

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {API_KEY}", **kwargs.pop("headers", {})}
        return requests.post(self.url + path, headers=headers, timeout=WAIT_S, **kwargs)

    def ping(self) -> int:
        return requests.get(f"{self.url}/ping", timeout=10).status_code

    def engine_requests(self) -> int:
        return requests.get(f"http://127.0.0.1:{self.status_port}/status", timeout=10).json()["engine_requests"]

    def wait_engine_requests(self, count: int) -> None:
        wait_until(lambda: self.engine_requests() == count, WAIT_S, f"{count} engine requests", self.worker)


def ping_or_none(url: str):
    try:
        return requests.get(url, timeout=5).status_code
    except requests.ConnectionError:
        return None


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir, tmp_path_factory):
    port, status_port = free_port(), free_port()
    env = subprocess_env(**engine_env(tiny_model_dir, PORT=str(port), WORKER_STATUS_PORT=str(status_port),
                                      API_KEY=API_KEY, MAX_MODEL_LEN="4096", GPU_MEMORY_UTILIZATION="0.05"))
    worker = WorkerProcess(env, tmp_path_factory.mktemp("http"), "http-worker")
    pings: List[int] = []
    url = f"http://127.0.0.1:{port}/ping"
    try:
        wait_until(lambda: pings.append(ping_or_none(url)) or pings[-1] == 200, START_TIMEOUT_S,
                   "/ping 200", worker, step=0.2)
        yield Endpoint(worker, port, status_port, [code for code in pings if code is not None])
    finally:
        worker.kill_group()


def test_ping_answers_204_while_starting_then_200(endpoint):
    assert endpoint.pings[0] == 204 and endpoint.pings[-1] == 200, endpoint.pings
    assert set(endpoint.pings) == {204, 200}, endpoint.pings
    assert endpoint.ping() == 200


def test_models_list_names_the_served_model(endpoint):
    assert [model.id for model in endpoint.client.models.list().data] == [endpoint.model]


def test_chat_stream_deltas_concatenate_to_the_whole_answer(endpoint):
    body = dict(model=endpoint.model, messages=QUESTION, max_tokens=24, temperature=0, seed=7)
    whole = endpoint.client.chat.completions.create(**body)
    assert isinstance(whole, ChatCompletion) and whole.choices[0].message.role == "assistant"
    chunks = list(endpoint.client.chat.completions.create(**body, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert len(chunks) > 2  # streamed, not one answer


def test_completions_stream_and_not(endpoint):
    body = dict(model=endpoint.model, prompt="Ljubljana je mesto, kjer", max_tokens=20, temperature=0,
                extra_body={"ignore_eos": True})
    whole = endpoint.client.completions.create(**body)
    assert isinstance(whole, Completion) and whole.usage.completion_tokens == 20
    chunks = list(endpoint.client.completions.create(**body, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text


def test_the_contracts_errors_carry_their_status(endpoint):
    with pytest.raises(openai.NotFoundError):
        endpoint.client.completions.create(model="no-such-model", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as refused:
        endpoint.client.chat.completions.create(model=endpoint.model, messages=QUESTION, max_tokens=2,
                                                extra_body={"use_beam_search": True})
    assert "beam search" in refused.value.message


HOSTILE = [  # (path, body bytes, headers, status)
    ("/v1/completions", b"{not json", {}, 400),
    ("/v1/completions", b"\xff\xfe\x00", {}, 400),
    ("/v1/completions", b'{"prompt": "\\ud800 lone", "max_tokens": 2}', {}, 400),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, {}, 400),
    ("/v1/completions", b'["a list"]', {}, 400),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), {}, 400),
    ("/v1/completions", b" " * (31 * 2**20), {}, 413),
    ("/v1/no-such-route", b"{}", {}, 404),
    ("/v1/completions", b'{"prompt": "a"}', {"Authorization": "Bearer wrong"}, 401),
]


@pytest.mark.parametrize("path, body, headers, status", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_hostile_requests_get_json_errors_and_the_server_serves_on(endpoint, path, body, headers, status):
    answer = endpoint.post(path, data=body, headers=headers)
    assert answer.status_code == status, answer.text[:300]
    error = answer.json()["error"]
    assert error["code"] == status and error["message"]
    assert endpoint.ping() == 200


def test_a_missing_key_is_refused(endpoint):
    answer = requests.get(f"{endpoint.url}/v1/models", timeout=WAIT_S)
    assert answer.status_code == 401 and answer.json()["error"]["type"] == "AuthenticationError"


def long_stream(endpoint: Endpoint) -> requests.Response:
    body = {"prompt": "Ljubljana", "max_tokens": 3500, "ignore_eos": True, "temperature": 0, "stream": True}
    return endpoint.post("/v1/completions", json=body, stream=True)


def test_a_client_that_leaves_frees_its_engine_request(endpoint):
    # Two identical streams run in one batch at one pace: the one left must end while the other runs on.
    left, kept = long_stream(endpoint), long_stream(endpoint)
    kept_lines = kept.iter_lines()
    endpoint.wait_engine_requests(2)
    left.close()
    endpoint.wait_engine_requests(1)
    assert next(line for line in kept_lines if line).startswith(b"data: {")  # still streaming
    kept.close()
    endpoint.wait_engine_requests(0)


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(endpoint):
    body = {"prompt": "Ljubljana", "max_tokens": 200, "ignore_eos": True, "temperature": 0, "stream": True}
    events: List[Dict[str, Any]] = []

    def read() -> None:
        with endpoint.post("/v1/completions", json=body, stream=True) as answer:
            events.extend(json.loads(line[6:]) if line != b"data: [DONE]" else {"done": True}
                          for line in answer.iter_lines() if line)

    reader = threading.Thread(target=read)
    reader.start()
    endpoint.wait_engine_requests(1)
    endpoint.worker.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: ping_or_none(f"{endpoint.url}/ping") in (503, None), WAIT_S, "/ping 503", endpoint.worker)
    reader.join(WAIT_S)
    assert events[-1] == {"done": True}
    assert events[-2]["choices"][0]["finish_reason"] == "length"  # all 200 tokens
    assert endpoint.worker.proc.wait(WAIT_S) == 0
    assert API_KEY not in endpoint.worker.stdout() + endpoint.worker.stderr()
