"""A job of a take the worker could not read (nested deeper than Python's JSON parser follows, or not
JSON): only its id is known, and the platform fails it itself, in the plain shape (its dialect is unknown)."""

from __future__ import annotations

from typing import Any, AsyncIterator, Dict

from gams_worker.errors import INVALID_INPUT, error_output


class UnreadableJob(Dict[str, Any]):
    def __init__(self, job_id: str, why: str):
        super().__init__(id=job_id, input=None)
        self.why = f"the job could not be read: its JSON {why}"

    async def outputs(self) -> AsyncIterator[Dict[str, str]]:
        yield error_output(INVALID_INPUT, self.why, "input")
