"""OpenAI passthrough jobs straight into the service, on the real vLLM CPU engine.

A job is what RunPod makes of a call to /openai/v1/...: {"openai_route", "openai_input"}.
Every output must validate as the openai package's own types, so the official client
can read what the platform relays.
"""

from __future__ import annotations

import json

import jsonschema
import openai.types
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response

from tests.harness.openai_samples import CITY_SCHEMA, QUESTION

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def sse_events(outputs):
    """Parse the stream outputs: each must be a str of whole SSE events; the last ends with [DONE]."""
    assert outputs and all(isinstance(o, str) for o in outputs), outputs
    assert outputs[-1].endswith("data: [DONE]\n\n")
    events = []
    for output in outputs:
        assert output.endswith("\n\n"), output  # whole events only
        for event in output[:-2].split("\n\n"):
            assert event.startswith("data: "), event
            events.append(event[len("data: "):])
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


def completion_chunk(event):
    """A /v1/completions stream event as openai.types.Completion.

    OpenAI's own streams send ``finish_reason: null`` in all but the last chunk, which
    that type does not allow (the client builds stream chunks without validating), so a
    null is checked here and the rest of the chunk validated.
    """
    was_null = [choice["finish_reason"] is None for choice in event["choices"]]
    for choice in event["choices"]:
        choice["finish_reason"] = choice["finish_reason"] or "length"
    chunk = Completion.model_validate(event)
    for choice, null in zip(chunk.choices, was_null):
        if null:
            choice.finish_reason = None
    return chunk


def chat_text_of(chunks, index=0):
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)


# ---- on the engine


@pytest.fixture(scope="module")
def openai_job(run_job):
    def run(route, body=None):
        job = {"openai_route": route}
        if body is not None:
            job["openai_input"] = body
        return run_job(job)

    return run


@pytest.fixture(scope="module")
def model(worker):
    return worker.config.model_label


def greedy(model, **extra):
    return {"model": model, "temperature": 0, "seed": 7, "max_tokens": 24, **extra}


@pytest.mark.engine
def test_models_list_names_the_served_model(openai_job, model):
    (output,) = openai_job("/v1/models")
    assert output["object"] == "list"
    models = [openai.types.Model.model_validate(m) for m in output["data"]]
    assert [m.id for m in models] == [model]


@pytest.mark.engine
def test_chat_stream_deltas_concatenate_to_the_non_stream_text(openai_job, model):
    body = greedy(model, messages=QUESTION, max_tokens=40)
    (whole,) = openai_job(CHAT, body)
    completion = ChatCompletion.model_validate(whole)
    assert completion.model == model
    text = completion.choices[0].message.content
    assert text and completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens <= 40

    outputs = openai_job(CHAT, {**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [ChatCompletionChunk.model_validate(e) for e in sse_events(outputs)]
    assert chat_text_of(chunks) == text
    assert chunks[-1].usage == completion.usage  # include_usage: a last chunk with the totals
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [completion.choices[0].finish_reason]
    # batched: fewer outputs (RunPod posts) than events, yet more than one
    assert 2 <= len(outputs) < len(chunks)


@pytest.mark.engine
def test_completions_stream_and_non_stream(openai_job, model):
    body = greedy(model, prompt="Ljubljana je mesto, kjer", max_tokens=20, ignore_eos=True)
    (whole,) = openai_job(COMPLETIONS, body)
    completion = Completion.model_validate(whole)
    assert completion.object == "text_completion"
    assert completion.usage.completion_tokens == 20
    assert completion.choices[0].finish_reason == "length"

    chunks = [completion_chunk(e) for e in sse_events(openai_job(COMPLETIONS, {**body, "stream": True}))]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text


@pytest.mark.engine
def test_n_two_choices_with_seed(openai_job, model):
    body = {"model": model, "messages": QUESTION, "n": 2, "temperature": 1.0, "seed": 11, "max_tokens": 8,
            "ignore_eos": True}
    completion = ChatCompletion.model_validate(openai_job(CHAT, body)[0])
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage.completion_tokens == 16
    again = ChatCompletion.model_validate(openai_job(CHAT, body)[0])
    assert [c.message.content for c in again.choices] == [c.message.content for c in completion.choices]

    chunks = [ChatCompletionChunk.model_validate(e) for e in sse_events(openai_job(CHAT, {**body, "stream": True}))]
    assert [chat_text_of(chunks, i) for i in (0, 1)] == [c.message.content for c in completion.choices]


@pytest.mark.engine
def test_logprobs_chat_and_completions(openai_job, model):
    body = greedy(model, messages=QUESTION, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=3)
    completion = ChatCompletion.model_validate(openai_job(CHAT, body)[0])
    content = completion.choices[0].logprobs.content
    assert len(content) == 6
    assert "".join(item.token for item in content) == completion.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(max(top.logprob for top in item.top_logprobs))  # greedy
        assert bytes(item.bytes).decode("utf-8") == item.token

    body = greedy(model, prompt="Ljubljana je", max_tokens=4, ignore_eos=True, logprobs=2)
    completion = Completion.model_validate(openai_job(COMPLETIONS, body)[0])
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(top) == 2 for top in logprobs.top_logprobs)


@pytest.mark.engine
def test_json_schema_response_parses_and_validates(openai_job, model):
    # The tiny model loves newlines, which JSON allows between tokens; the penalty moves it on.
    body = greedy(model, messages=[{"role": "user", "content": "Katero je glavno mesto Slovenije?"}],
                  max_tokens=200, frequency_penalty=2.0,
                  response_format={"type": "json_schema", "json_schema": {"name": "mesto", "schema": CITY_SCHEMA}})
    completion = ChatCompletion.model_validate(openai_job(CHAT, body)[0])
    assert completion.choices[0].finish_reason == "stop", completion.choices[0].message.content
    jsonschema.validate(json.loads(completion.choices[0].message.content), CITY_SCHEMA)


@pytest.mark.engine
def test_system_message_is_folded_into_the_first_user_turn(openai_job, model):
    system = {"role": "system", "content": "Odgovarjaj kratko."}
    with_system = ChatCompletion.model_validate(openai_job(CHAT, greedy(model, messages=[system, *QUESTION]))[0])
    folded = [{"role": "user", "content": system["content"] + "\n\n" + QUESTION[0]["content"]}]
    by_hand = ChatCompletion.model_validate(openai_job(CHAT, greedy(model, messages=folded))[0])
    assert with_system.choices[0].message.content == by_hand.choices[0].message.content
    assert with_system.usage.prompt_tokens == by_hand.usage.prompt_tokens


@pytest.mark.engine
def test_stop_and_max_completion_tokens(openai_job, model):
    body = greedy(model, messages=QUESTION, max_tokens=30, ignore_eos=True)
    text = ChatCompletion.model_validate(openai_job(CHAT, body)[0]).choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    stopped = ChatCompletion.model_validate(openai_job(CHAT, {**body, "stop": [stop]})[0]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == text[:text.index(stop)]

    short = greedy(model, messages=QUESTION, max_completion_tokens=3, ignore_eos=True)
    del short["max_tokens"]
    assert ChatCompletion.model_validate(openai_job(CHAT, short)[0]).usage.completion_tokens == 3


@pytest.mark.engine
def test_max_stop_strings_hold_in_both_dialects(openai_job, run_job, model):
    """MAX_STOP_STRINGS (16) holds for OpenAI jobs too: vLLM alone caps their stop lists at 4."""
    body = greedy(model, messages=QUESTION, max_tokens=30, ignore_eos=True)
    text = ChatCompletion.model_validate(openai_job(CHAT, body)[0]).choices[0].message.content
    stop = [f"\u0444{i}" for i in range(15)] + [text[len(text) // 2:len(text) // 2 + 3]]
    stopped = ChatCompletion.model_validate(openai_job(CHAT, {**body, "stop": stop})[0]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.message.content == text[:text.index(stop[-1])]
    completion = openai_job(COMPLETIONS, greedy(model, prompt="Ljubljana je", stop=stop))[0]
    assert Completion.model_validate(completion).choices[0].finish_reason in ("stop", "length")
    plain = run_job({"messages": QUESTION, "sampling_params": {"temperature": 0, "seed": 7, "max_tokens": 30,
                                                               "ignore_eos": True, "stop": stop}})[-1]
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["choices"][0]["text"] == stopped.message.content


@pytest.mark.engine
@pytest.mark.parametrize(
    "route, body, status, param",
    [
        (CHAT, {"model": "gpt-4o", "messages": QUESTION}, 404, "model"),
        (CHAT, {"messages": QUESTION, "temperature": -1}, 400, "temperature"),
        (CHAT, {"messages": QUESTION, "max_tokens": 100000}, 400, "max_tokens"),
        (CHAT, {"messages": QUESTION, "temprature": 0.5}, 400, "temprature"),  # vLLM alone would ignore it
        (CHAT, {"messages": "hi"}, 400, "messages"),
        (CHAT, {"messages": [*QUESTION, {"role": "system", "content": "x"}]}, 400, "messages[1].role"),
        (CHAT, {"messages": [{"role": "assistant", "content": "x"}]}, 400, None),  # the template refuses
        (COMPLETIONS, {"prompt": "a", "n": 0}, 400, None),
        # The input limits of plain jobs (MAX_N, MAX_STOP_STRINGS, ...), checked before vLLM sees the request
        (COMPLETIONS, {"prompt": "Bled", "n": 500, "max_tokens": 400}, 400, "n"),
        (CHAT, {"messages": QUESTION, "stop": ["x"] * 20}, 400, "stop"),
        (CHAT, {"messages": QUESTION, "stop": ["a", "s" * 257]}, 400, "stop[1]"),
        (COMPLETIONS, {"prompt": "č" * 200_001}, 400, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "č" * 200_001}]}]}, 400, "messages"),
        (CHAT, {"messages": QUESTION * 257}, 400, "messages"),
        (COMPLETIONS, {"prompt": "a" * 1_100_000}, 400, "openai_input"),  # MAX_INPUT_BYTES
        ("/v1/embeddings", {"input": "a"}, 404, "openai_route"),
        (CHAT, None, 400, "openai_input"),
    ],
)
def test_bad_request_gets_an_openai_error_and_the_next_request_succeeds(openai_job, model, route, body,
                                                                         status, param):
    (output,) = openai_job(route, body)
    error = json.loads(output["error"])  # JSON text: the SDK str()s a job's error
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    good = ChatCompletion.model_validate(openai_job(CHAT, greedy(model, messages=QUESTION, max_tokens=2))[0])
    assert good.usage.completion_tokens >= 1


@pytest.mark.engine
def test_unknown_job_field_is_rejected(run_job):
    (output,) = run_job({"openai_route": CHAT, "openai_input": {"messages": QUESTION}, "extra": 1})
    error = json.loads(output["error"])
    assert error["param"] == "extra" and error["code"] == 400


# ---- Responses, tokenize, detokenize

RESPONSES = "/v1/responses"


def responses_events(outputs):
    """Parse Responses stream outputs: whole SSE events ``event: <type>\\ndata: {json}``, no [DONE]."""
    assert outputs and all(isinstance(o, str) and o.endswith("\n\n") for o in outputs), outputs
    events = []
    for event in "".join(outputs)[:-2].split("\n\n"):
        name, data = event.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), event
        events.append(json.loads(data[len("data: "):]))
        assert events[-1]["type"] == name[len("event: "):]
    return events


@pytest.mark.engine
def test_responses_stream_deltas_concatenate_to_the_non_stream_output(openai_job, model):
    body = {"model": model, "input": QUESTION[0]["content"], "temperature": 0, "max_output_tokens": 24}
    (whole,) = openai_job(RESPONSES, body)
    response = Response.model_validate(whole)
    assert response.object == "response" and response.model == model
    assert response.output_text and response.usage.output_tokens <= 24

    outputs = openai_job(RESPONSES, {**body, "stream": True})
    events = responses_events(outputs)
    assert [events[0]["type"], events[-1]["type"]] == ["response.created", "response.completed"]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == response.output_text
    assert Response.model_validate(events[-1]["response"]).output_text == response.output_text
    assert 2 <= len(outputs) < len(events)  # batched like chat streams


@pytest.mark.engine
def test_responses_instructions_are_folded_like_a_system_message(openai_job, model):
    system = "Odgovarjaj kratko."
    response = Response.model_validate(openai_job(RESPONSES, {
        "model": model, "instructions": system, "input": QUESTION[0]["content"], "temperature": 0,
        "max_output_tokens": 24})[0])
    chat = ChatCompletion.model_validate(openai_job(CHAT, greedy(
        model, messages=[{"role": "system", "content": system}, *QUESTION]))[0])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


@pytest.mark.engine
def test_tokenize_and_detokenize(openai_job, model, worker):
    (tokenized,) = openai_job("/v1/tokenize", {"model": model, "prompt": "Ljubljana je lepa."})
    assert tokenized["tokens"] == worker.tokenizer.encode("Ljubljana je lepa.")  # with <bos>
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == 512
    (detokenized,) = openai_job("/v1/detokenize", {"model": model, "tokens": tokenized["tokens"]})
    assert detokenized["prompt"].endswith("Ljubljana je lepa.")

    messages = [{"role": "system", "content": "Odgovarjaj kratko."}, *QUESTION]
    (chat_tokens,) = openai_job("/v1/tokenize", {"messages": messages, "add_generation_prompt": True})
    chat = ChatCompletion.model_validate(openai_job(CHAT, greedy(model, messages=messages, max_tokens=1))[0])
    assert chat_tokens["count"] == chat.usage.prompt_tokens  # the same folded, templated prompt


@pytest.mark.engine
@pytest.mark.parametrize("route, body, param", [
    (RESPONSES, {"input": "a", "max_output_tokens": "many"}, "max_output_tokens"),
    (RESPONSES, {"input": "a", "temprature": 0}, "temprature"),
    (RESPONSES, {"input": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "input"),
    ("/v1/detokenize", {"tokens": "abc"}, "tokens"),
    ("/v1/tokenize", {"prompt": "a", "unknown": 1}, "unknown"),
    # The input limits of plain jobs, on the fields /v1/responses has
    (RESPONSES, {"input": "a", "stop": ["x"] * 20}, "stop"),
    (RESPONSES, {"input": "a", "stop": ["s" * 257]}, "stop[0]"),
    (RESPONSES, {"input": "č" * 200_001}, "input"),
    (RESPONSES, {"instructions": "č" * 150_000, "input": [{"role": "user", "content": "č" * 60_000}]}, "input"),
    (RESPONSES, {"input": [{"role": "user", "content": "a"}] * 257}, "input"),
    (RESPONSES, {"input": "a" * 1_100_000}, "openai_input"),  # MAX_INPUT_BYTES
    ("/v1/tokenize", {"messages": QUESTION * 257}, "messages"),
])
def test_bad_responses_and_tokenize_requests_name_the_field(openai_job, model, route, body, param):
    (output,) = openai_job(route, body)
    error = json.loads(output["error"])
    assert error["code"] == 400 and error["type"] == "BadRequestError" and error["param"] == param, error


@pytest.mark.engine
def test_unknown_route_names_the_served_routes(openai_job):
    (output,) = openai_job("/v1/embeddings", {"input": "a"})
    error = json.loads(output["error"])
    assert error["code"] == 404 and error["type"] == "NotFoundError"
    for route in (CHAT, COMPLETIONS, "/v1/models", RESPONSES, "/v1/tokenize", "/v1/detokenize"):
        assert route in error["message"]
