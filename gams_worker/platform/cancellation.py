"""Freeing a stopped job's engine request at once.

RunPod stops a job (cancel, timeout) by cancelling the task that iterates the
handler. While that task waits in the SDK (posting a chunk), the job's generator is
paused at ``yield`` and is closed only when its last reference goes: when the SDK's
loop drops the task (within milliseconds in runpod 1.12 with our job loop), or at a
garbage collection if a reference cycle holds it (an earlier SDK loop: not within
5 s). Until then its engine request keeps its KV cache and batch slot. Closing the
generator as soon as the task is cancelled runs its ``finally``, which aborts the
request, whatever the SDK keeps.
"""

from __future__ import annotations

import asyncio
from typing import AsyncGenerator, Set

_closing: Set[asyncio.Future] = set()  # close tasks, referenced until they finish


def close_when_cancelled(outputs: AsyncGenerator) -> None:
    """Close ``outputs`` as soon as the current task is cancelled."""

    def on_done(task: asyncio.Task) -> None:
        if task.cancelled():
            closing = asyncio.ensure_future(outputs.aclose())
            _closing.add(closing)
            closing.add_done_callback(_closing.discard)

    asyncio.current_task().add_done_callback(on_done)
