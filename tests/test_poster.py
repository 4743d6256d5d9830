"""The job's stream and result POSTs (gams_worker/platform/poster.py) against the RunPod emulator, no engine.

Each test runs a handler (an async generator, as handler.py's) through ``ResultPoster.run_job``
with a real aiohttp session and real HTTP, and where the SDK's behaviour is the contract, runs
the same handler through the SDK's own ``rp_job.handle_job`` and compares what the emulator got.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Dict, List

import aiohttp
import pytest
from aiohttp import web
from runpod.serverless.modules import rp_http, rp_job

from gams_worker.platform.poster import ResultPoster
from tests.harness.runpod_emulator import RunPodEmulator

FAST_RETRIES = (0.01, 0.01)  # the SDK waits 2 s and 3 s; the count of attempts is what is tested
SLOVENE = ["Ljubljana", " je", " glavno mesto", " Slovenije: čebele, šola, žganci 🙂"]


@pytest.fixture(scope="module")
def emulator():
    emulator = RunPodEmulator(hold_s=0.1, stop_hold_s=0.1)
    emulator.start()
    yield emulator
    emulator.close()


def url_templates(emulator: RunPodEmulator) -> Dict[str, str]:
    """The SDK's post URL templates for this emulator, worker id filled in as rp_http does."""
    env = emulator.worker_env()
    return {name: env[variable].replace("$RUNPOD_POD_ID", emulator.worker_id)
            for name, variable in (("stream", "RUNPOD_WEBHOOK_POST_STREAM"), ("done", "RUNPOD_WEBHOOK_POST_OUTPUT"))}


def chunks_of(outputs: List[Any]):
    async def handler(job):
        for output in outputs:
            yield output
    return handler


async def run(handler, job: Dict[str, Any], poster: ResultPoster, aggregate: bool = True) -> None:
    config = {"handler": handler, "return_aggregate_stream": aggregate}
    assert ResultPoster.serves(config)
    async with aiohttp.ClientSession() as session:
        await poster.run_job(session, config, job)


def poster_for(emulator: RunPodEmulator) -> ResultPoster:
    urls = url_templates(emulator)
    return ResultPoster(urls["stream"], urls["done"], retry_waits_s=FAST_RETRIES)


def outputs(count: int) -> List[Dict[str, Any]]:
    items = [{"choices": [{"index": 0, "text": SLOVENE[i % len(SLOVENE)]}]} for i in range(count - 1)]
    last = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": {"completion_tokens": 9}}
    return items + [last]


def test_the_same_posts_as_the_sdk(emulator, monkeypatch):
    """Chunks in order, each once, then the aggregate result: what the SDK's own handle_job posts."""
    urls = url_templates(emulator)
    monkeypatch.setattr(rp_http, "JOB_STREAM_URL", urls["stream"])
    monkeypatch.setattr(rp_http, "JOB_DONE_URL", urls["done"])
    items = outputs(7)
    ours, sdks = emulator.submit({"n": 1}), emulator.submit({"n": 2})

    async def scenario():
        await run(chunks_of(items), {"id": ours, "input": {}}, poster_for(emulator))
        async with aiohttp.ClientSession() as session:
            await rp_job.handle_job(session, {"handler": chunks_of(items), "return_aggregate_stream": True},
                                    {"id": sdks, "input": {}})

    asyncio.run(scenario())
    mine, theirs = emulator.wait_result(ours, 5), emulator.wait_result(sdks, 5)
    assert mine.chunk_outputs == theirs.chunk_outputs == items
    assert mine.results[0][1] == theirs.results[0][1] == {"output": items}
    assert len(mine.results) == 1
    assert [t for t, _ in mine.chunks] == sorted(t for t, _ in mine.chunks)
    assert mine.results[0][0] >= mine.chunks[-1][0]  # the result after the last chunk


def test_without_return_aggregate_stream_the_result_is_empty(emulator):
    job_id = emulator.submit({})
    asyncio.run(run(chunks_of(outputs(3)), {"id": job_id, "input": {}}, poster_for(emulator), aggregate=False))
    record = emulator.wait_result(job_id, 5)
    assert len(record.chunks) == 3 and record.result == {"output": []}


def test_the_next_output_is_taken_once_the_post_before_it_was_answered(emulator):
    job_id = emulator.submit({})
    seen: List[int] = []  # chunks the emulator had when the handler was resumed

    async def handler(job):
        for i in range(5):
            yield {"choices": [{"index": 0, "text": str(i)}]}
            seen.append(len(emulator.jobs[job_id].chunks))

    asyncio.run(run(handler, {"id": job_id, "input": {}}, poster_for(emulator)))
    assert seen == [1, 2, 3, 4, 5]


def test_server_errors_are_retried_and_each_chunk_arrives_once_in_place(emulator):
    job_id = emulator.submit({})
    items = outputs(4)
    emulator.fail_stream_posts(2)  # the first chunk's first two attempts
    asyncio.run(run(chunks_of(items), {"id": job_id, "input": {}}, poster_for(emulator)))
    record = emulator.wait_result(job_id, 5)
    assert emulator.failed_stream_posts >= 2
    assert record.chunk_outputs == items and record.result == {"output": items}


def test_a_chunk_failing_every_attempt_is_logged_and_the_job_goes_on(emulator, capsys):
    job_id = emulator.submit({})
    items = outputs(3)
    failed_before = emulator.failed_stream_posts
    emulator.fail_stream_posts(3)  # all attempts of the first chunk, as the SDK gives up after 3
    asyncio.run(run(chunks_of(items), {"id": job_id, "input": {}}, poster_for(emulator)))
    record = emulator.wait_result(job_id, 5)
    assert emulator.failed_stream_posts - failed_before == 3
    assert record.chunk_outputs == items[1:]  # the lost chunk is lost, as with the SDK...
    assert record.result == {"output": items}  # ...but in the result
    assert "Failed to return job results. | 500" in capsys.readouterr().out


def test_an_error_output_ends_the_job_with_that_error(emulator):
    job_id = emulator.submit({})
    error = json.dumps({"type": "invalid_input", "message": "must be a non-empty string", "field": "prompt"})
    asyncio.run(run(chunks_of([{"choices": [{"index": 0, "text": "a"}]}, {"error": error}, {"never": "sent"}]),
                    {"id": job_id, "input": {}}, poster_for(emulator)))
    record = emulator.wait_result(job_id, 5)
    assert record.chunk_outputs == [{"choices": [{"index": 0, "text": "a"}]}]
    assert record.results[0][1] == {"error": error}


def test_a_handler_exception_ends_the_job_with_the_sdks_error(emulator):
    job_id = emulator.submit({})

    async def handler(job):
        yield {"choices": [{"index": 0, "text": "a"}]}
        raise RuntimeError("boom")

    asyncio.run(run(handler, {"id": job_id, "input": {}}, poster_for(emulator)))
    error = emulator.wait_result(job_id, 5).result["error"]
    assert error.startswith("handler: boom \ntraceback: Traceback")


@pytest.mark.parametrize("job_input, expected", [
    ({"prompt": "x"}, {"type": "worker_error"}),
    ({"openai_route": "/v1/completions", "openai_input": {}}, {"type": "InternalServerError", "code": 500}),
])
def test_an_output_that_cannot_be_sent_as_utf8_json_still_ends_in_a_posted_error(emulator, job_input, expected):
    """The SDK raised UnicodeEncodeError out of its loop here and posted nothing: a lost job."""
    job_id = emulator.submit(job_input)
    closed = []

    async def handler(job):
        try:
            yield {"choices": [{"index": 0, "text": "Bled"}]}
            yield {"choices": [{"index": 0, "text": "\udc80"}]}  # a lone surrogate
            yield {"choices": [{"index": 0, "text": "never sent"}]}
        finally:
            closed.append(True)

    asyncio.run(run(handler, {"id": job_id, "input": job_input}, poster_for(emulator)))
    record = emulator.wait_result(job_id, 5)
    assert record.chunk_outputs == [{"choices": [{"index": 0, "text": "Bled"}]}]
    error = json.loads(record.result["error"])
    assert {key: error[key] for key in expected} == expected
    assert "UTF-8 JSON" in error["message"] and "surrogate" in error["message"]
    assert closed == [True]  # the handler was closed (a real job aborts its engine request there)


def test_the_sdk_itself_loses_a_job_whose_output_cannot_be_encoded(emulator, monkeypatch):
    """Why the worker does not leave these posts to the SDK: its job ends in an exception, no result posted."""
    urls = url_templates(emulator)
    monkeypatch.setattr(rp_http, "JOB_STREAM_URL", urls["stream"])
    monkeypatch.setattr(rp_http, "JOB_DONE_URL", urls["done"])
    job_id = emulator.submit({})

    async def scenario():
        async with aiohttp.ClientSession() as session:
            config = {"handler": chunks_of([{"text": "\udc80"}]), "return_aggregate_stream": True}
            await rp_job.handle_job(session, config, {"id": job_id, "input": {}})

    with pytest.raises(UnicodeEncodeError):
        asyncio.run(scenario())
    assert emulator.jobs[job_id].results == []


def test_an_error_whose_text_holds_a_lone_surrogate_is_still_posted(emulator):
    job_id = emulator.submit({})
    error = json.dumps({"type": "invalid_input", "message": "unknown field", "field": "\udc80"}, ensure_ascii=False)
    asyncio.run(run(chunks_of([{"error": error}]), {"id": job_id, "input": {}}, poster_for(emulator)))
    record = emulator.wait_result(job_id, 5)
    assert json.loads(record.result["error"])["field"] == "\udc80"  # escaped on the wire, whole in JSON


def test_a_stopped_job_posts_nothing_more_and_its_handler_is_closed(emulator):
    job_id = emulator.submit({})
    closed = []

    async def handler(job):
        try:
            yield {"choices": [{"index": 0, "text": "a"}]}
            await asyncio.sleep(3600)
            yield {"choices": [{"index": 0, "text": "b"}]}
        finally:
            closed.append(True)

    async def scenario():
        task = asyncio.ensure_future(run(handler, {"id": job_id, "input": {}}, poster_for(emulator)))
        while not emulator.jobs[job_id].chunks:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()  # what the SDK's stop_job does
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    record = emulator.jobs[job_id]
    assert len(record.chunks) == 1 and record.results == []
    assert closed == [True]


def test_a_post_failing_on_the_connection_is_retried():
    """A keep-alive connection the server closed: the SDK dropped that post (and so a job's result)."""
    received: List[Any] = []
    attempts = {"n": 0}

    async def scenario():
        async def take(request: web.Request) -> web.Response:
            attempts["n"] += 1
            if attempts["n"] == 1:
                request.transport.close()  # the connection drops before any answer
                return web.Response(text="never read")
            received.append((request.path, json.loads(await request.text())))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/{kind}/{job}", take)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        poster = ResultPoster(f"http://127.0.0.1:{port}/stream/$ID?gpu=x", f"http://127.0.0.1:{port}/done/$ID?gpu=x",
                              retry_waits_s=FAST_RETRIES)
        try:
            await run(chunks_of(outputs(2)), {"id": "j", "input": {}}, poster)
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    assert attempts["n"] == 4  # one dropped, then the two chunks and the result
    assert [path for path, _ in received] == ["/stream/j", "/stream/j", "/done/j"]
    assert received[2][1] == {"output": outputs(2)}


def test_options_this_path_does_not_implement_go_to_the_sdk():
    async def generator(job):
        yield {}

    def plain(job):
        return {}

    assert ResultPoster.serves({"handler": generator, "return_aggregate_stream": True})
    assert not ResultPoster.serves({"handler": plain})
    assert not ResultPoster.serves({"handler": generator, "refresh_worker": True})
    assert not ResultPoster.serves({"handler": generator, "rp_args": {"rp_debugger": True}})
