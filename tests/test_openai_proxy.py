"""The official openai client against the worker through RunPod's /openai/v1 surface.

One `python handler.py` subprocess on the real runpod SDK job loop, the platform
emulator (tests/harness/runpod_emulator.py) and its OpenAI proxy (tests/harness/openai_proxy.py); the
client's base_url is the proxy's ``/v2/<endpoint>/openai/v1``, as on RunPod.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai.types.responses import Response

from tests.harness.openai_proxy import OpenAIProxy
from tests.harness.openai_samples import CITY_SCHEMA, QUESTION
from tests.harness.runpod_emulator import RunPodEmulator
from tests.harness.worker_process import start_platform_worker, wait_for_first_take

pytestmark = pytest.mark.engine

SERVED_NAME = "gams-9b-instruct"  # SERVED_MODEL_NAME; the direct tests cover the MODEL_NAME default


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """(client, model name, emulator): one worker process for the module."""
    emulator = RunPodEmulator(hold_s=1.0)
    emulator.start()
    proxy = OpenAIProxy(emulator)
    base_url = proxy.start()
    worker = start_platform_worker(emulator, tiny_model_dir, tmp_path_factory.mktemp("openai-worker"),
                                   "openai-worker", MAX_CONCURRENCY="16", SERVED_MODEL_NAME=SERVED_NAME)
    try:
        wait_for_first_take(emulator, worker)
        client = openai.OpenAI(base_url=base_url, api_key="emulated-key", max_retries=0, timeout=300)
        yield client, SERVED_NAME, emulator
    finally:
        worker.terminate()
        proxy.close()
        emulator.close()


@pytest.fixture(scope="module")
def client(served):
    return served[0]


@pytest.fixture(scope="module")
def model(served):
    return served[1]


def test_models_list(client, model):
    assert [m.id for m in client.models.list()] == [model]


def test_chat_stream_concatenates_to_the_non_stream_text(client, model, served):
    emulator = served[2]
    params = dict(model=model, messages=QUESTION, temperature=0, seed=5, max_tokens=40)
    whole = client.chat.completions.create(**params)
    text = whole.choices[0].message.content
    assert text and whole.model == model

    jobs_before = len(emulator.jobs)
    chunks = list(client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage == whole.usage
    # RunPod saw one job, and its chunks were batches of several SSE events
    (job,) = list(emulator.jobs.values())[jobs_before:]
    assert job.input["openai_route"] == "/v1/chat/completions" and job.input["openai_input"]["stream"] is True
    assert 2 <= len(job.chunks) < len(chunks)


def test_completions(client, model):
    params = dict(model=model, prompt="Ljubljana je mesto, kjer", temperature=0, max_tokens=12,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**params)
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**params, stream=True) if c.choices)
    assert streamed == whole.choices[0].text


def test_json_schema_response_parses_and_validates(client, model):
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Katero je glavno mesto Slovenije?"}],
        temperature=0, seed=7, max_tokens=200, frequency_penalty=2.0,
        response_format={"type": "json_schema", "json_schema": {"name": "mesto", "schema": CITY_SCHEMA}},
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content), CITY_SCHEMA)


def test_n_two_and_logprobs(client, model):
    completion = client.chat.completions.create(
        model=model, messages=QUESTION, n=2, temperature=1.0, seed=3, max_tokens=6,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )
    assert [c.index for c in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert len(choice.logprobs.content) == 6
        assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)


def test_system_message_is_folded(client, model):
    system = "Odgovarjaj kratko."
    params = dict(model=model, temperature=0, max_tokens=16)
    with_system = client.chat.completions.create(messages=[{"role": "system", "content": system}, *QUESTION],
                                                 **params)
    by_hand = client.chat.completions.create(
        messages=[{"role": "user", "content": f"{system}\n\n{QUESTION[0]['content']}"}], **params)
    assert with_system.choices[0].message.content == by_hand.choices[0].message.content


@pytest.mark.parametrize(
    "params, error_class, param",
    [
        ({"model": "gpt-4o"}, openai.NotFoundError, "model"),
        ({"temperature": -1}, openai.BadRequestError, "temperature"),
        ({"extra_body": {"temprature": 0.5}}, openai.BadRequestError, "temprature"),
    ],
)
def test_invalid_request_raises_the_matching_openai_error(client, model, params, error_class, param):
    params = {"model": model, "messages": QUESTION, "max_tokens": 4, **params}
    for stream in (False, True):
        with pytest.raises(error_class) as info:
            client.chat.completions.create(**params, stream=stream)
        assert info.value.body["param"] == param
    # and the worker keeps serving
    assert client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2).choices


def test_responses_stream_and_not_validate_as_openai_responses(client, model):
    params = dict(model=model, input="Kaj je vredno videti v Ljubljani?", temperature=0, max_output_tokens=24)
    raw = client.responses.with_raw_response.create(**params)
    response = Response.model_validate(raw.http_response.json())
    assert raw.parse().output_text == response.output_text and response.output_text
    assert response.status in ("completed", "incomplete") and response.usage.output_tokens <= 24

    events = list(client.responses.create(**params, stream=True))
    assert [events[0].type, events[-1].type] == ["response.created", "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
    final = Response.model_validate(events[-1].response.model_dump(mode="json"))
    assert final.output_text == response.output_text and final.usage == response.usage


def test_responses_instructions_on_a_template_without_a_system_role(client, model):
    response = client.responses.create(model=model, instructions="Odgovarjaj kratko.", input="Živjo!",
                                       temperature=0, max_output_tokens=8)
    assert response.status in ("completed", "incomplete") and response.output_text


def test_tokenize_and_detokenize(client, model):
    tokenized = client.post("/tokenize", body={"model": model, "prompt": "Ljubljana"}, cast_to=object)
    assert tokenized["count"] == len(tokenized["tokens"]) > 1
    detokenized = client.post("/detokenize", body={"model": model, "tokens": tokenized["tokens"]}, cast_to=object)
    assert detokenized["prompt"].endswith("Ljubljana")


def test_unknown_route_is_a_not_found_naming_the_served_routes(client, model):
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model=model, input="a")
    assert "/v1/responses" in info.value.message and "/v1/chat/completions" in info.value.message
