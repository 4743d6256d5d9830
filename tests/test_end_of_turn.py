"""Chat jobs stop at the chat template's end of turn, whatever generation_config.json says.

The engine tests run a worker on builder/end_of_turn_model.py: a tiny model whose
generation_config.json lists only <eos> and whose weights make <end_of_turn> the greedy token
after a full stop. Without the worker's end-of-turn rule its chat answers run on into the
next turn until max_tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from builder import end_of_turn_model, tiny_model
from gams_worker.jobs.input import prepare_prompt
from gams_worker.jobs.chat_template import (
    ChatTemplateFacts, accepts_system_role, find_end_of_turn, probe_chat_template, report_stop_tokens,
    stop_at_end_of_turn,
)
from gams_worker.jobs.input import parse_job_input
from tests.conftest import collect
from tests.harness.worker_process import engine_env

# Gemma 3's way with a system message: its text opens the first user turn.
GEMMA3_LIKE_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set rest = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# A template that ends turns with <eos> and renders system messages (ChatML-like layout).
EOS_TURN_TEMPLATE = (
    "{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<eos>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>assistant\n' }}{% endif %}"
)
# One that writes plain text after a turn, and drops system messages without a word.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model.build())


def with_template(tokenizer, template):
    copy = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    copy.chat_template = template
    return copy


# ---- without the engine


def test_end_of_turn_token_is_read_from_the_template(tokenizer):
    assert find_end_of_turn(tokenizer) == (5, "<end_of_turn>")  # the tiny model's Gemma 2 template
    assert find_end_of_turn(with_template(tokenizer, GEMMA3_LIKE_TEMPLATE)) == (5, "<end_of_turn>")
    assert find_end_of_turn(with_template(tokenizer, EOS_TURN_TEMPLATE)) == (1, "<eos>")
    assert find_end_of_turn(with_template(tokenizer, PLAIN_TEMPLATE)) is None


def test_system_role_is_decided_by_rendering_one(tokenizer):
    assert accepts_system_role(tokenizer) is False  # Gemma 2's template raises
    assert accepts_system_role(with_template(tokenizer, GEMMA3_LIKE_TEMPLATE)) is True
    assert accepts_system_role(with_template(tokenizer, EOS_TURN_TEMPLATE)) is True
    assert accepts_system_role(with_template(tokenizer, PLAIN_TEMPLATE)) is False  # drops it


def test_system_message_goes_to_a_template_that_renders_it(tokenizer):
    job = parse_job_input({"messages": [{"role": "system", "content": "Bodi kratek."},
                                        {"role": "user", "content": "Živjo"}]}, default_max_tokens=16)
    gemma3 = with_template(tokenizer, GEMMA3_LIKE_TEMPLATE)
    as_is = prepare_prompt(job, gemma3, 512, probe_chat_template(gemma3))
    assert gemma3.decode(as_is.token_ids) == "<bos><start_of_turn>user\nBodi kratek.\n\nŽivjo<end_of_turn>\n" \
                                             "<start_of_turn>model\n"
    folded = prepare_prompt(job, tokenizer, 512, probe_chat_template(tokenizer))
    assert tokenizer.decode(folded.token_ids) == tokenizer.decode(as_is.token_ids)  # the same words, folded
    eos_turns = with_template(tokenizer, EOS_TURN_TEMPLATE)
    rendered = eos_turns.decode(prepare_prompt(job, eos_turns, 512, probe_chat_template(eos_turns)).token_ids)
    assert rendered.startswith("<start_of_turn>system\nBodi kratek.<eos>")  # not folded


def test_stop_is_added_like_a_generation_config_eos():
    from vllm import SamplingParams

    facts = ChatTemplateFacts(end_of_turn_id=107, end_of_turn_token="<end_of_turn>", accepts_system=False)
    params = stop_at_end_of_turn(SamplingParams(max_tokens=8, min_tokens=2, stop_token_ids=[9]), facts, 1)
    assert sorted(params.stop_token_ids) == [9, 107]
    assert {1, 9, 107} <= params.all_stop_token_ids  # min_tokens holds the end of turn back too
    ignoring = stop_at_end_of_turn(SamplingParams(max_tokens=8, ignore_eos=True), facts, 1)
    assert ignoring.stop_token_ids == []  # ignore_eos: no end-of-turn stop either
    none = ChatTemplateFacts(end_of_turn_id=None, end_of_turn_token=None, accepts_system=True)
    assert stop_at_end_of_turn(SamplingParams(max_tokens=8), none, 1).stop_token_ids == []


def test_report_names_every_stop_id_and_its_source(tokenizer):
    facts = probe_chat_template(tokenizer)
    report = report_stop_tokens(facts, tokenizer, {"eos_token_id": 1}, "generation_config.json")
    assert report.line == ("stop tokens: all jobs: <eos>=1 (tokenizer eos_token; generation_config.json "
                           "eos_token_id); chat jobs (messages, OpenAI chat, Responses) also: <end_of_turn>=5 "
                           "(the chat template's end of turn)")
    assert report.warning.startswith("generation_config.json lacks the chat template's end-of-turn token "
                                     "<end_of_turn>=5")
    complete = report_stop_tokens(facts, tokenizer, {"eos_token_id": [1, 5]}, "generation_config.json")
    assert complete.warning is None
    assert complete.line.endswith("<end_of_turn>=5 (generation_config.json eos_token_id); chat jobs (messages, "
                                  "OpenAI chat, Responses): nothing more (the chat template's end of turn is "
                                  "among them)")


# ---- on the engine, with a model whose generation config lacks <end_of_turn>


@pytest.fixture(scope="module")
def eot_worker(loop_thread):
    """(worker, probe, start-up log records) on the end-of-turn model; closed with the module."""
    from gams_worker.config import load_config
    from gams_worker.worker import start_worker

    model_dir = end_of_turn_model.build()
    probe = json.loads((Path(model_dir) / end_of_turn_model.PROBE_FILE).read_text())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("gams_worker.jobs.chat_template")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        # A small KV cache: this engine may run beside the session's shared one.
        worker = start_worker(load_config(engine_env(str(model_dir), GPU_MEMORY_UTILIZATION="0.05")))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    yield worker, probe, records
    worker.close()


@pytest.fixture(scope="module")
def job(eot_worker, loop_thread):
    counter = iter(range(10**6))

    def run(job_input):
        return loop_thread.run(collect(eot_worker[0].jobs, {"id": f"eot-{next(counter)}", "input": job_input}))

    return run


def chat_input(probe, **sampling):
    return {"messages": [{"role": "user", "content": probe["question"]}],
            "sampling_params": {"temperature": 0, "max_tokens": 64, **sampling}}


@pytest.mark.engine
def test_startup_log_warns_that_the_generation_config_lacks_the_end_of_turn(eot_worker):
    lines = [record.getMessage() for record in eot_worker[2]]
    assert ("stop tokens: all jobs: <eos>=1 (tokenizer eos_token; generation_config.json eos_token_id); "
            "chat jobs (messages, OpenAI chat, Responses) also: <end_of_turn>=5 (the chat template's end of turn)"
            ) in lines
    warnings = [r.getMessage() for r in eot_worker[2] if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "lacks the chat template's end-of-turn token <end_of_turn>=5" in warnings[0]


@pytest.mark.engine
@pytest.mark.parametrize("stream", [False, True])
def test_chat_job_stops_at_the_end_of_turn(eot_worker, job, stream):
    probe = eot_worker[1]
    outputs = job({**chat_input(probe), "stream": stream})
    assert "error" not in outputs[-1], outputs
    text = "".join(choice["text"] for output in outputs for choice in output["choices"])
    (last,) = outputs[-1]["choices"]
    assert last["finish_reason"] == "stop"
    assert text == probe["answer"]  # up to the turn's end, nothing of the next turn
    assert outputs[-1]["usage"]["completion_tokens"] == probe["answer_tokens"] + 1  # + <end_of_turn>


@pytest.mark.engine
def test_without_the_stop_the_chat_runs_into_the_next_turn(eot_worker, job):
    """What the generation config alone gives: ignore_eos lifts the end-of-turn stop too."""
    probe = eot_worker[1]
    (output,) = job(chat_input(probe, ignore_eos=True))
    text = output["choices"][0]["text"]
    assert output["choices"][0]["finish_reason"] == "length"
    assert text.startswith(probe["answer"] + probe["run_on"])


@pytest.mark.engine
def test_prompt_job_keeps_only_the_model_eos(eot_worker, job):
    probe = eot_worker[1]
    # The answer ends with ".", after which <end_of_turn> is the greedy token: not a stop here.
    (output,) = job({"prompt": probe["answer"], "sampling_params": {"temperature": 0, "max_tokens": 12}})
    assert output["choices"][0]["finish_reason"] == "length"
    assert output["usage"]["completion_tokens"] == 12


@pytest.mark.engine
def test_openai_chat_and_responses_stop_at_the_end_of_turn(eot_worker, job):
    probe = eot_worker[1]
    body = {"messages": [{"role": "user", "content": probe["question"]}], "temperature": 0, "max_tokens": 64}
    (output,) = job({"openai_route": "/v1/chat/completions", "openai_input": body})
    completion = ChatCompletion.model_validate(output)
    choice = completion.choices[0]
    assert (choice.finish_reason, choice.message.content) == ("stop", probe["answer"])
    assert output["choices"][0]["stop_reason"] == 5  # the end of turn, not <eos>

    (output,) = job({"openai_route": "/v1/responses",
                     "openai_input": {"input": probe["question"], "temperature": 0, "max_output_tokens": 64}})
    response = Response.model_validate(output)
    assert response.status == "completed"
    assert response.output_text == probe["answer"]
