"""End-to-end jobs on the real vLLM CPU engine with the tiny GaMS-shaped model."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import collect

pytestmark = pytest.mark.engine

SLOVENE = "Kaj je vredno videti v Ljubljani? Čebele, šolske žlice in žganci 🙂"


def greedy(max_tokens=48, **extra):
    return {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, **extra}


def joined_text(outputs, index=0):
    return "".join(c["text"] for o in outputs for c in o["choices"] if c["index"] == index)


def test_stream_arrives_in_order_in_several_chunks_ending_with_usage(run_job):
    outputs = run_job({"prompt": SLOVENE, "sampling_params": greedy(64), "stream": True})
    assert len(outputs) >= 3, outputs
    assert all("error" not in o for o in outputs)
    assert all("usage" not in o for o in outputs[:-1])
    last = outputs[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    usage = last["usage"]
    assert usage["completion_tokens"] == 64
    assert usage["prompt_tokens"] > 10
    assert 0 < usage["time_to_first_token_s"] <= usage["total_time_s"]
    assert usage["tokens_per_second"] > 0
    assert last["engine"]["mode"] in ("full", "piecewise", "eager")
    # every chunk before the last carries text; none repeats the job's metadata
    assert all(o["choices"][0]["text"] for o in outputs[:-1])


def test_stream_equals_non_stream_under_greedy(run_job):
    job = {"prompt": SLOVENE, "sampling_params": greedy(80)}
    streamed = run_job({**job, "stream": True})
    whole = run_job({**job, "stream": False})
    assert len(whole) == 1
    assert whole[0]["choices"][0]["text"] == joined_text(streamed)
    assert whole[0]["usage"]["completion_tokens"] == streamed[-1]["usage"]["completion_tokens"] == 80


def test_job_inputs_have_a_tokenizer_of_their_own_that_encodes_as_the_engines(worker, tiny_model_dir):
    from gams_worker.config import load_config
    from gams_worker.worker import _load_tokenizer, _tokenizer_is_the_models

    # Loaded while the engine starts (vLLM's way, uncached), not shared with vLLM's serving layer.
    assert worker.input_tokenizer is not worker.tokenizer
    loaded = _load_tokenizer(worker.config, tiny_model_dir)
    assert loaded is not worker.tokenizer and type(loaded).__name__ == type(worker.tokenizer).__name__
    assert _tokenizer_is_the_models(worker.config)
    assert not _tokenizer_is_the_models(load_config({"TOKENIZER_NAME": "other/tokenizer"}))
    assert not _tokenizer_is_the_models(load_config({"ENGINE_ARGS": '{"tokenizer_mode": "slow"}'}))
    text = "Kaj je vredno videti v Ljubljani? Čebele in žganci."
    assert worker.input_tokenizer.encode(text) == worker.tokenizer.encode(text)
    assert worker.input_tokenizer.chat_template == worker.tokenizer.chat_template
    assert loaded.encode(text) == worker.tokenizer.encode(text)


def test_utf8_integrity_on_slovene_text(run_job, worker):
    outputs = run_job({"prompt": "Šola, čebela, žganci: ", "sampling_params": greedy(120), "stream": True})
    text = joined_text(outputs)
    # the model writes Slovene letters, and no chunk broke a character on the way
    assert any(ch in text for ch in "čšžČŠŽ"), text
    assert "\ufffd" not in text
    for output in outputs:
        output["choices"][0]["text"].encode("utf-8")  # no lone surrogates
    # the streamed text equals decoding the whole generation at once
    ids = worker.tokenizer.encode(text, add_special_tokens=False)
    assert worker.tokenizer.decode(ids) == text


def test_sixteen_concurrent_jobs_equal_their_sequential_runs(worker, loop_thread):
    starts = ["Triglav", "Ljubljana", "Prešeren", "Vreme", "Knjižnica", "Čaj", "Števila", "Slovenija",
              "The weather", "Language models", "Numbers", "Žganci", "Pozimi", "Šolsko", "Sreča", "Write"]
    prompts = [f"{start} {i}" for i, start in enumerate(starts)]
    jobs = [{"id": f"c{i}", "input": {"prompt": p, "sampling_params": greedy(32), "stream": i % 2 == 0}}
            for i, p in enumerate(prompts)]
    sequential = [joined_text(loop_thread.run(collect(worker.jobs, job))) for job in jobs]

    async def all_at_once():
        return await asyncio.gather(*(collect(worker.jobs, job) for job in jobs))

    concurrent = [joined_text(outputs) for outputs in loop_thread.run(all_at_once())]
    assert concurrent == sequential
    assert len(set(sequential)) > 1  # the prompts really lead to different texts
    assert worker.jobs.running_jobs == 0


def test_system_message_is_folded_into_first_user_turn(run_job):
    messages = [
        {"role": "system", "content": "Odgovarjaj v slovenščini."},
        {"role": "user", "content": "Kaj je glavno mesto Slovenije?"},
    ]
    outputs = run_job({"messages": messages, "sampling_params": greedy(16)})
    assert "error" not in outputs[0], outputs
    folded = run_job({"messages": [{"role": "user", "content": "Odgovarjaj v slovenščini.\n\nKaj je glavno mesto Slovenije?"}],
                      "sampling_params": greedy(16)})
    assert outputs[0]["choices"][0]["text"] == folded[0]["choices"][0]["text"]
    assert outputs[0]["usage"]["prompt_tokens"] == folded[0]["usage"]["prompt_tokens"]


def test_n_choices_each_end_with_finish_reason(run_job):
    outputs = run_job({"prompt": SLOVENE, "sampling_params": {"max_tokens": 12, "n": 3, "seed": 1, "ignore_eos": True},
                       "stream": True})
    last = outputs[-1]
    assert sorted(c["index"] for c in last["choices"]) == [0, 1, 2]
    assert all(c["finish_reason"] == "length" for c in last["choices"])
    assert last["usage"]["completion_tokens"] == 36


@pytest.mark.parametrize(
    "bad_input, field",
    [
        ({}, "prompt"),  # missing prompt
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),  # both
        ({"prompt": 5}, "prompt"),  # wrong type
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"prompt": "a", "sampling_params": {"max_tokens": -3}}, "sampling_params.max_tokens"),
        ({"prompt": "a", "sampling_params": {"temprature": 0.5}}, "sampling_params.temprature"),
        ({"prompt": "a", "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature"),
        ({"prompt": "a", "stream": "yes"}, "stream"),
        ({"prompt": "a", "mode": "fast"}, "mode"),
        ({"prompt": "Ljubljana " * 600}, "prompt"),  # longer than MAX_MODEL_LEN=512
        ({"prompt": "a", "sampling_params": {"max_tokens": 100000}}, "sampling_params.max_tokens"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),  # template refuses
        ("just a string", "input"),
    ],
)
def test_bad_input_gets_structured_error_and_next_job_succeeds(run_job, bad_input, field):
    outputs = run_job(bad_input)
    assert len(outputs) == 1
    error = json.loads(outputs[0]["error"])  # JSON text: the SDK str()s a job's error
    assert error["type"] == "invalid_input"
    assert error["field"] == field
    assert error["message"]
    good = run_job({"prompt": "Živjo", "sampling_params": greedy(4)})
    assert good[-1]["usage"]["completion_tokens"] == 4


def test_with_vllm_stats_off_the_kv_cache_figures_are_still_read(worker):
    """LOG_ENGINE_STATS is off by default: the KV cache size the concurrency is sized from comes from
    the engine's start-up handshake, not from its stats."""
    from gams_worker.serving.concurrency import kv_capacity

    engine = worker.engine
    assert engine.log_stats is False and engine.logger_manager is None
    capacity = kv_capacity(engine)
    assert capacity is not None and capacity.kv_cache_tokens > 0
