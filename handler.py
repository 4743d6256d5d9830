"""RunPod serverless worker for the Slovene LLM GaMS, served by vLLM.

One vLLM engine per process, created before the job loop and shared by all jobs.
Engine creation stays under the __main__ guard: vLLM spawns its engine core as a
child process that re-imports this file.
"""

import asyncio
import sys

from gams_worker.config import load_config
from gams_worker.errors import ConfigError, WorkerError

service = None  # the process's GenerationService, set in main()
_closing = set()  # close tasks, referenced until they finish


async def handler(job):
    outputs = service.run(job)
    asyncio.current_task().add_done_callback(lambda task: _close_if_cancelled(task, outputs))
    async for output in outputs:
        yield output


def _close_if_cancelled(task, outputs) -> None:
    # RunPod stops a job by cancelling its task. A generator paused at `yield` is then closed
    # only once garbage-collected (measured: not within 5 s); close it now, so the service
    # aborts the engine request and frees its KV cache and batch slot at once.
    if task.cancelled():
        closing = asyncio.ensure_future(outputs.aclose())
        _closing.add(closing)
        closing.add_done_callback(_closing.discard)


def main() -> int:
    global service
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"gams-worker: configuration error: {exc}", file=sys.stderr, flush=True)
        return 2

    import runpod

    from gams_worker.local_run import run_local, wants_local_run
    from gams_worker.worker import setup_logging, start_worker

    setup_logging(config)
    try:
        worker = start_worker(config)
    except WorkerError as exc:  # engine start failed for a classified cause, or no model
        print(f"gams-worker: {exc}", file=sys.stderr, flush=True)
        return 1
    service = worker.service
    try:
        if wants_local_run(sys.argv, config.on_runpod):
            return run_local(handler, sys.argv)
        runpod.serverless.start({
            "handler": handler,
            "concurrency_modifier": lambda current: config.max_concurrency,
            "return_aggregate_stream": True,
        })
        return 0
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main())
