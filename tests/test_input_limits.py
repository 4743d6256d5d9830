"""The validation layer under generated input: limits, field names, and no unhandled exception.

A job's input passes parse_job_input (shape and limits), prepare_prompt (the tiny model's
real tokenizer and chat template, token length vs MAX_MODEL_LEN) and vLLM's SamplingParams,
exactly as PlainJobs.run does. Every input must come out accepted, or rejected
with a JobInputError naming a field; nothing else may escape.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gams_worker.config import load_config
from gams_worker.errors import ConfigError, JobInputError
from gams_worker.jobs.input import INPUT_FIELDS, SAMPLING_FIELDS, parse_job_input
from gams_worker.config import InputLimits
from gams_worker.jobs.input import prepare_prompt

# Small limits, so that generated inputs reach every one of them often.
SMALL = InputLimits(max_input_bytes=4096, max_prompt_chars=600, max_messages=6, max_stop_strings=3,
                    max_stop_length=12, max_n=4, max_sequences=4)
MAX_MODEL_LEN = 128
DEFAULT_MAX_TOKENS = 64
# a.b[0].c, or an odd key quoted as JSON: input[""], sampling_params["a.b"], messages[0]["x]"]
SEGMENT = r'[^.\[\]"]+(\[\d+\])*(\["(?:[^"\\]|\\.)*"\])?'
FIELD_PATH = re.compile(rf"^{SEGMENT}(\.{SEGMENT})*$")

text = st.text(alphabet=st.sampled_from("aeiou čšž ŠČŽ🙂\n\t<>{}'\"\\xLjubljana"), max_size=40)
long_text = st.text(alphabet="abč ", min_size=0, max_size=900)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False, allow_infinity=False), text)
any_json = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(text, inner, max_size=4)), max_leaves=12)
numbers = st.one_of(st.integers(-5, 300), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, 1, 0.5, 2.0, -1]))
sampling_value = {
    "max_tokens": st.one_of(numbers, st.integers(1, 200)),
    "min_tokens": st.one_of(numbers, st.integers(0, 10)),
    "temperature": numbers, "top_p": numbers, "top_k": st.one_of(numbers, st.integers(-1, 2**40)),
    "min_p": numbers, "repetition_penalty": numbers, "presence_penalty": numbers, "frequency_penalty": numbers,
    "stop": st.one_of(text, st.lists(text, max_size=6), any_json),
    "seed": st.one_of(numbers, st.integers(0, 2**64)), "n": st.one_of(numbers, st.integers(1, 6)),
    "ignore_eos": st.one_of(st.booleans(), json_scalar),
}
sampling_params = st.one_of(
    st.fixed_dictionaries({}, optional={k: st.one_of(v, st.none()) for k, v in sampling_value.items()}),
    st.dictionaries(st.sampled_from(list(SAMPLING_FIELDS) + ["temprature", "best_of", ""]), json_scalar, max_size=4),
    any_json,
)
content = st.one_of(text, long_text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                                               min_size=1, max_size=3), any_json)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "robot"]), "content": content}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), json_scalar, max_size=3),
    any_json,
)
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": text}), max_size=8),
    st.lists(message, max_size=8),
    any_json,
)
job_input = st.one_of(
    st.fixed_dictionaries({"prompt": st.one_of(text, long_text, any_json)},
                          optional={"sampling_params": sampling_params, "stream": st.one_of(st.booleans(), json_scalar)}),
    st.fixed_dictionaries({"messages": messages},
                          optional={"sampling_params": sampling_params, "stream": st.booleans()}),
    st.dictionaries(st.sampled_from(list(INPUT_FIELDS) + ["mode", "input"]), any_json, max_size=4),
    any_json,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def validate(raw: Any, tokenizer: Any) -> None:
    """What PlainJobs.run does before the engine; raises only JobInputError."""
    from vllm import SamplingParams

    job = parse_job_input(raw, DEFAULT_MAX_TOKENS, SMALL)
    assert len(json.dumps(raw, ensure_ascii=False).encode()) <= SMALL.max_input_bytes
    prompt_chars = len(job.prompt) if job.prompt is not None else sum(len(m["content"]) for m in job.messages)
    assert prompt_chars <= SMALL.max_prompt_chars
    assert job.messages is None or len(job.messages) <= SMALL.max_messages
    assert 1 <= job.sampling.get("n", 1) <= SMALL.max_n
    stop = job.sampling.get("stop", [])
    assert len(stop) <= SMALL.max_stop_strings and all(0 < len(s) <= SMALL.max_stop_length for s in stop)
    prepared = prepare_prompt(job, tokenizer, MAX_MODEL_LEN)
    assert 1 <= prepared.sampling["max_tokens"] <= MAX_MODEL_LEN - len(prepared.token_ids)
    SamplingParams(**prepared.sampling)  # vLLM accepts what we accepted


def test_10000_generated_inputs_are_accepted_or_rejected_by_field(tokenizer):
    outcomes: List[str] = []

    @settings(max_examples=10_000, deadline=None, database=None, derandomize=True,  # the same inputs every CI run
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(raw=job_input)
    def check(raw: Any) -> None:
        try:
            validate(raw, tokenizer)
        except JobInputError as exc:
            assert exc.field and FIELD_PATH.match(exc.field), exc.field
            root = re.split(r"[.\[]", exc.field)[0]
            assert root in INPUT_FIELDS or root == "input" or root in raw, (exc.field, raw)
            assert exc.message
            error = json.loads(exc.to_output()["error"])
            assert error["field"] == exc.field and error["type"] == "invalid_input"
            outcomes.append("rejected:" + (root if root in INPUT_FIELDS or root == "input" else "unknown key"))
            return
        outcomes.append("accepted")

    check()
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    print(f"\n[validation] {len(outcomes)} generated inputs: {counts}")
    assert len(outcomes) >= 10_000
    assert counts.get("accepted", 0) >= 100  # the generator reaches valid inputs too


def test_each_limit_is_inclusive_and_its_breach_names_the_field():
    limits = InputLimits()
    ok = {"prompt": "a"}

    def error(raw: Any) -> JobInputError:
        with pytest.raises(JobInputError) as info:
            parse_job_input(raw, 16, limits)
        return info.value

    parse_job_input({"prompt": "č" * limits.max_prompt_chars}, 16, limits)
    assert error({"prompt": "č" * (limits.max_prompt_chars + 1)}).field == "prompt"
    half = limits.max_prompt_chars // 2
    parse_job_input({"messages": [{"role": "user", "content": "a" * half},
                                  {"role": "assistant", "content": "b" * half}]}, 16, limits)
    assert error({"messages": [{"role": "user", "content": "a" * half},
                               {"role": "assistant", "content": "b" * (half + 1)}]}).field == "messages"
    many = [{"role": "user", "content": "x"}] * limits.max_messages
    parse_job_input({"messages": many}, 16, limits)
    assert error({"messages": many + many[:1]}).field == "messages"
    parse_job_input({**ok, "sampling_params": {"stop": ["s"] * limits.max_stop_strings}}, 16, limits)
    assert error({**ok, "sampling_params": {"stop": ["s"] * (limits.max_stop_strings + 1)}}).field == "sampling_params.stop"
    parse_job_input({**ok, "sampling_params": {"stop": ["s" * limits.max_stop_length]}}, 16, limits)
    assert error({**ok, "sampling_params": {"stop": ["a", "s" * (limits.max_stop_length + 1)]}}).field == "sampling_params.stop[1]"
    parse_job_input({**ok, "sampling_params": {"n": limits.max_n}}, 16, limits)
    assert error({**ok, "sampling_params": {"n": limits.max_n + 1}}).field == "sampling_params.n"
    huge = {**ok, "sampling_params": {"seed": 1}, "stream": False}
    padding = limits.max_input_bytes - len(json.dumps({**huge, "prompt": ""}, ensure_ascii=False).encode())
    assert error({**huge, "prompt": "a" * (padding + 1)}).field == "input"
    assert error({"prompt": "a\ud800b"}).field == "input"  # a lone surrogate: the tokenizer would choke
    assert error({**ok, "sampling_params": {"top_k": 2**31}}).field == "sampling_params.top_k"
    message = error({"prompt": "č" * (limits.max_prompt_chars + 1)}).message
    assert "MAX_PROMPT_CHARS" in message and str(limits.max_prompt_chars) in message


def test_openai_bodies_meet_the_same_limits_named_by_their_own_fields():
    from gams_worker.jobs.openai_input import CHAT_ROUTE, COMPLETIONS_ROUTE, ROUTE_FIELDS, check_openai_body

    def field(body: Any, route: str = COMPLETIONS_ROUTE) -> Any:
        try:
            check_openai_body(route, body, set(ROUTE_FIELDS[route]), SMALL, None)
        except JobInputError as exc:
            return exc.field
        return None

    chat = [{"role": "user", "content": "Živjo"}]
    assert field({"messages": chat, "n": SMALL.max_n, "stop": ["s" * SMALL.max_stop_length] * SMALL.max_stop_strings},
                 CHAT_ROUTE) is None
    assert field({"prompt": "Bled", "n": SMALL.max_n + 1}) == "n"
    assert field({"prompt": "Bled", "stop": "s" * (SMALL.max_stop_length + 1)}) == "stop[0]"
    assert field({"prompt": "Bled", "stop": ["s"] * (SMALL.max_stop_strings + 1)}) == "stop"
    assert field({"prompt": ["a" * 300, "b" * 301]}) == "prompt"  # all prompts of a batch together
    assert field({"prompt": ["a"] * (SMALL.max_sequences + 1)}) == "prompt"  # prompts x n
    assert field({"prompt": ["a", "b"], "n": 2}) is None
    assert field({"messages": chat * (SMALL.max_messages + 1)}, CHAT_ROUTE) == "messages"
    parts = [{"type": "text", "text": "a" * 300}, {"type": "text", "text": "b" * 301}]
    assert field({"messages": [{"role": "user", "content": parts}]}, CHAT_ROUTE) == "messages"
    assert field({"prompt": "a" * SMALL.max_input_bytes}) == "openai_input"
    # Types as plain jobs check them: vLLM's model would coerce these.
    assert field({"prompt": "Bled", "n": "2"}) == "n"
    assert field({"prompt": "Bled", "n": 2.0}) == "n"
    assert field({"prompt": "Bled", "stop": 5}) == "stop"
    assert field({"messages": "hi"}, CHAT_ROUTE) == "messages"
    assert field({"prompt": [[1, 2, 3]], "n": 1}) is None  # token ids


def test_every_accepted_openai_field_is_one_of_vllms_request_fields():
    """The contract's lists name vLLM 0.32's own fields: a rename there must fail here, not pass silently."""
    from gams_worker.jobs import openai as openai_jobs
    from gams_worker.jobs.openai_input import ROUTE_FIELDS, TOKENIZE_ROUTE

    vllm = openai_jobs.import_vllm_openai()
    for route, fields in ROUTE_FIELDS.items():
        bodies = [{"messages": []}, {"prompt": ""}] if route == TOKENIZE_ROUTE else [{}]
        known = set().union(*(openai_jobs.ROUTE_TABLE[route].request_class(vllm, body).model_fields for body in bodies))
        assert set(fields) <= known, (route, set(fields) - known)


def test_limits_come_from_the_environment_with_documented_defaults():
    assert load_config({}).input_limits == InputLimits(
        max_input_bytes=1_048_576, max_prompt_chars=200_000, max_messages=256,
        max_stop_strings=16, max_stop_length=256, max_n=16, max_sequences=16, max_stop_token_ids=16,
        max_bad_words=16, max_logprobs=20, max_logit_bias=300, max_prompt_logprobs_tokens=256,
        max_grammar_bytes=32_768, max_schema_depth=32, grammar_compile_timeout_s=10.0)
    config = load_config({"MAX_INPUT_BYTES": "2048", "MAX_PROMPT_CHARS": "10", "MAX_MESSAGES": "2",
                          "MAX_STOP_STRINGS": "0", "MAX_STOP_LENGTH": "3", "MAX_N": "2", "MAX_SEQUENCES": "3",
                          "MAX_STOP_TOKEN_IDS": "4", "MAX_BAD_WORDS": "5", "MAX_LOGPROBS": "6", "MAX_LOGIT_BIAS": "7",
                          "MAX_PROMPT_LOGPROBS_TOKENS": "8", "MAX_GRAMMAR_BYTES": "9", "MAX_SCHEMA_DEPTH": "10",
                          "GRAMMAR_COMPILE_TIMEOUT_S": "2.5", "WORKER_STATUS_PORT": "9000"})
    assert config.input_limits == InputLimits(2048, 10, 2, 0, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10, 2.5)
    assert config.status_port == 9000
    with pytest.raises(JobInputError) as info:
        parse_job_input({"prompt": "a", "sampling_params": {"stop": "x"}}, 16, config.input_limits)
    assert info.value.field == "sampling_params.stop"
    for variable, value in [("MAX_INPUT_BYTES", "10"), ("MAX_PROMPT_CHARS", "0"), ("MAX_N", "many"),
                            ("MAX_STOP_STRINGS", "-1"), ("WORKER_STATUS_PORT", "70000"), ("WORKER_STATUS_PORT", "0"),
                            ("MAX_SCHEMA_DEPTH", "65"), ("GRAMMAR_COMPILE_TIMEOUT_S", "-1"),
                            ("GRAMMAR_COMPILE_TIMEOUT_S", "nan")]:
        with pytest.raises(ConfigError) as info:
            load_config({variable: value})
        assert variable in str(info.value) and repr(value) in str(info.value)


def test_every_limit_holds_the_same_in_both_dialects_up_to_vllms_own_caps():
    """A job at every declared limit passes both dialects (vLLM's request models and SamplingParams
    included: vLLM alone caps OpenAI stop lists at 4), and no limit can be set above a cap of vLLM's."""
    from vllm import SamplingParams

    from gams_worker.config import WorkerConfig
    from gams_worker.jobs import openai as openai_jobs
    from gams_worker.jobs.chat_template import ChatTemplateFacts
    from gams_worker.jobs.openai_input import CHAT_ROUTE, COMPLETIONS_ROUTE, RESPONSES_ROUTE
    from gams_worker.jobs.streaming import FlushPolicy

    config = WorkerConfig()
    limits = config.input_limits
    stop = [f"s{i}" for i in range(limits.max_stop_strings)]
    plain = parse_job_input({"prompt": "Bled", "sampling_params": {"stop": stop, "n": limits.max_n}}, 16, limits)
    assert SamplingParams(**plain.sampling).stop == stop
    routes = openai_jobs.OpenAIJobs(None, config, ChatTemplateFacts(None, None, False), FlushPolicy(1, 1, 1.0),
                                    None, None)
    vllm = openai_jobs.import_vllm_openai()
    at_limits = {"stop": stop, "bad_words": ["b"] * limits.max_bad_words}
    for route, body in [(CHAT_ROUTE, {"messages": [{"role": "user", "content": "a"}], "n": limits.max_n,
                                      "top_logprobs": limits.max_logprobs, "logprobs": True, **at_limits}),
                        (COMPLETIONS_ROUTE, {"prompt": ["a"] * limits.max_sequences, "logprobs": limits.max_logprobs,
                                             **at_limits}),
                        (RESPONSES_ROUTE, {"input": "a", "stop": stop})]:
        _, _, request = routes._parse({"openai_route": route, "openai_input": body}, vllm)
        assert request.stop == stop, route
    for variable, above_vllms_cap in [("MAX_N", "16385"), ("MAX_SEQUENCES", "1025"), ("MAX_BAD_WORDS", "65"),
                                      ("MAX_LOGPROBS", "21")]:
        with pytest.raises(ConfigError, match=variable):
            load_config({variable: above_vllms_cap})


def test_trust_remote_code_is_off_unless_set():
    from gams_worker.startup.engine import engine_kwargs

    assert load_config({}).trust_remote_code is False
    assert engine_kwargs(load_config({}), "eager", "/m")["trust_remote_code"] is False
    assert engine_kwargs(load_config({"TRUST_REMOTE_CODE": "true"}), "eager", "/m")["trust_remote_code"] is True


def test_non_json_values_are_rejected_not_crashed():
    for raw in ({"prompt": "a", "sampling_params": {"temperature": math.nan}},
                {"prompt": "a", "stream": math.inf}):
        with pytest.raises(JobInputError) as info:
            parse_job_input(raw, 16)
        assert info.value.field == "input"
