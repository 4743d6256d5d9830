"""The job dispatch, without the engine: one dialect per job, decided once; errors always JSON."""

from __future__ import annotations

import asyncio
import json

from gams_worker.jobs.dialects import JobDispatch


class Dialect:
    """Records the jobs it ran; fails after one output when asked to."""

    def __init__(self, fail: bool = False):
        self.ran = []
        self.fail = fail

    async def run(self, job):
        self.ran.append(job)
        yield {"ok": True}
        if self.fail:
            raise KeyError("a bug")


def outputs(router, job):
    async def collect():
        return [output async for output in router.run(job)]

    return asyncio.run(collect())


def test_each_job_goes_to_its_dialect_once():
    plain, openai = Dialect(), Dialect()
    router = JobDispatch(plain, openai)
    outputs(router, {"id": "a", "input": {"prompt": "Bled"}})
    outputs(router, {"id": "b", "input": {"openai_route": "/v1/models"}})
    outputs(router, {"id": "c", "input": "openai_route"})  # not an object: a (bad) plain job
    assert [job["id"] for job in plain.ran] == ["a", "c"]
    assert openai.ran == [{"openai_route": "/v1/models"}]  # the OpenAI layer gets the input
    assert router.running_jobs == 0


def test_a_bug_in_either_dialect_still_ends_the_job_with_a_json_error():
    router = JobDispatch(Dialect(fail=True), Dialect(fail=True))
    first, last = outputs(router, {"id": "a", "input": {"prompt": "Bled"}})
    assert first == {"ok": True}
    assert json.loads(last["error"]) == {"type": "worker_error",
                                         "message": "the worker failed on this job: KeyError: 'a bug'"}
    _, last = outputs(router, {"id": "b", "input": {"openai_route": "/v1/models"}})
    assert json.loads(last["error"]) == {"message": "the worker failed on this job: KeyError: 'a bug'",
                                         "type": "InternalServerError", "param": None, "code": 500}
    assert router.running_jobs == 0
