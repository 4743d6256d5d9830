"""Validation of job inputs and prompt preparation (no engine)."""

import json

import pytest

from builder import tiny_model
from gams_worker.errors import JobInputError
from gams_worker.jobs.chat import fold_system_message, prepare_prompt
from gams_worker.jobs.input import parse_job_input


def parse(raw):
    return parse_job_input(raw, default_max_tokens=256)


def field_of(raw):
    with pytest.raises(JobInputError) as info:
        parse(raw)
    return info.value.field


def test_prompt_job_with_all_sampling_fields():
    job = parse({
        "prompt": "Živjo", "stream": True,
        "sampling_params": {"max_tokens": 10, "min_tokens": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 0,
                            "min_p": 0.05, "repetition_penalty": 1.1, "presence_penalty": -0.5,
                            "frequency_penalty": 0.5, "stop": "\n", "seed": 3, "n": 2, "ignore_eos": False},
    })
    assert job.prompt == "Živjo" and job.stream is True and job.max_tokens_given
    assert job.sampling["top_k"] == -1  # 0 means "no top-k", as -1 does
    assert job.sampling["stop"] == ["\n"]
    assert job.sampling["temperature"] == 0.5 and job.sampling["n"] == 2


def test_defaults():
    job = parse({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert job.stream is False
    assert job.sampling == {"max_tokens": 256}
    assert not job.max_tokens_given
    assert job.messages == ({"role": "user", "content": "ab"},)


@pytest.mark.parametrize("raw, field", [
    (None, "input"),
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "a", "messages": []}, "prompt"),
    ({"messages": []}, "messages"),
    ({"messages": [["user", "hi"]]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "a", "name": "x"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"prompt": "a", "sampling_params": []}, "sampling_params"),
    ({"prompt": "a", "sampling_params": {"max_tokens": 0}}, "sampling_params.max_tokens"),
    ({"prompt": "a", "sampling_params": {"max_tokens": 2.5}}, "sampling_params.max_tokens"),
    ({"prompt": "a", "sampling_params": {"max_tokens": True}}, "sampling_params.max_tokens"),
    ({"prompt": "a", "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
    ({"prompt": "a", "sampling_params": {"temperature": float("nan")}}, "input"),  # not JSON
    ({"prompt": "a", "sampling_params": {"top_p": 0}}, "sampling_params.top_p"),
    ({"prompt": "a", "sampling_params": {"top_k": -2}}, "sampling_params.top_k"),
    ({"prompt": "a", "sampling_params": {"n": 17}}, "sampling_params.n"),
    ({"prompt": "a", "sampling_params": {"stop": ["ok", ""]}}, "sampling_params.stop[1]"),
    ({"prompt": "a", "sampling_params": {"stop": 5}}, "sampling_params.stop"),
    ({"prompt": "a", "sampling_params": {"seed": -1}}, "sampling_params.seed"),
    ({"prompt": "a", "sampling_params": {"ignore_eos": "yes"}}, "sampling_params.ignore_eos"),
    ({"prompt": "a", "sampling_params": {"beam_width": 4}}, "sampling_params.beam_width"),
    ({"prompt": "a", "stream": 1}, "stream"),
])
def test_each_bad_input_names_its_field(raw, field):
    assert field_of(raw) == field


def test_error_output_is_json_text():
    with pytest.raises(JobInputError) as info:
        parse({"prompt": "a", "sampling_params": {"n": 0}})
    output = info.value.to_output()
    assert list(output) == ["error"] and isinstance(output["error"], str)  # the SDK str()s it: keep it JSON
    assert json.loads(output["error"]) == {
        "type": "invalid_input", "message": "must be an integer >= 1", "field": "sampling_params.n"}


def message(role, content, **extra):
    return {"role": role, "content": content, **extra}


def test_system_message_folds_into_first_user_turn():
    chat = fold_system_message([message("system", "Bodi kratek."), message("user", "Živjo"),
                                message("assistant", "Pozdravljeni"), message("user", "Kako si?")])
    assert chat == [message("user", "Bodi kratek.\n\nŽivjo"), message("assistant", "Pozdravljeni"),
                    message("user", "Kako si?")]
    assert fold_system_message([message("system", "Samo sistem.")]) == [message("user", "Samo sistem.")]
    with pytest.raises(JobInputError) as info:
        fold_system_message([message("user", "a"), message("system", "b")])
    assert info.value.field == "messages[1].role"


def test_system_folding_keeps_openai_content_parts_and_names():
    parts = [{"type": "text", "text": "Živjo"}]
    folded = fold_system_message([message("system", [{"type": "text", "text": "S"}]),
                                  message("user", parts, name="ana")])
    assert folded == [message("user", [{"type": "text", "text": "S\n\n"}] + parts, name="ana")]
    for bad, field in [([message("system", [{"type": "image_url"}])], "messages[0].content[0]"),
                       ([message("system", "S"), message("user", None)], "messages[1].content"),
                       (["hi"], "messages[0]")]:
        with pytest.raises(JobInputError) as info:
            fold_system_message(bad)
        assert info.value.field == field


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model.build()))


def test_chat_prompt_goes_through_the_model_template_without_double_bos(tokenizer):
    job = parse({"messages": [{"role": "system", "content": "Bodi kratek."}, {"role": "user", "content": "Živjo"}]})
    prompt = prepare_prompt(job, tokenizer, max_model_len=512)
    text = tokenizer.decode(prompt.token_ids)
    assert text == "<bos><start_of_turn>user\nBodi kratek.\n\nŽivjo<end_of_turn>\n<start_of_turn>model\n"
    assert prompt.token_ids.count(tokenizer.bos_token_id) == 1


def test_template_refusal_is_a_field_error(tokenizer):
    job = parse({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    with pytest.raises(JobInputError) as info:
        prepare_prompt(job, tokenizer, max_model_len=512)
    assert info.value.field == "messages" and "alternate" in info.value.message


def test_min_tokens_may_not_exceed_the_max_tokens_that_fit(tokenizer):
    with pytest.raises(JobInputError) as info:
        prepare_prompt(parse({"prompt": "a", "sampling_params": {"max_tokens": 5, "min_tokens": 6}}), tokenizer, 512)
    assert info.value.field == "sampling_params.min_tokens"
    shrunk = parse({"prompt": "Ljubljana", "sampling_params": {"min_tokens": 64}})  # default max_tokens 256
    with pytest.raises(JobInputError) as info:
        prepare_prompt(shrunk, tokenizer, max_model_len=64)
    assert info.value.field == "sampling_params.min_tokens"


def test_default_max_tokens_shrinks_to_fit_but_explicit_is_never_cut(tokenizer):
    prompt = prepare_prompt(parse({"prompt": "Ljubljana"}), tokenizer, max_model_len=64)
    assert prompt.sampling["max_tokens"] == 64 - len(prompt.token_ids)
    with pytest.raises(JobInputError) as info:
        prepare_prompt(parse({"prompt": "Ljubljana", "sampling_params": {"max_tokens": 64}}), tokenizer, max_model_len=64)
    assert info.value.field == "sampling_params.max_tokens"
    with pytest.raises(JobInputError) as info:
        prepare_prompt(parse({"prompt": "Ljubljana " * 100}), tokenizer, max_model_len=64)
    assert info.value.field == "prompt" and "MAX_MODEL_LEN is 64" in info.value.message
