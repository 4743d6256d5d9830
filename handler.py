"""RunPod serverless worker for the Slovene LLM GaMS, served by vLLM.

One vLLM engine per process, created before the job loop and shared by all jobs.
Engine creation stays under the __main__ guard: vLLM spawns its engine core as a
child process that re-imports this file.
"""

import sys

from gams_worker.platform.cancellation import close_when_cancelled
from gams_worker.config import load_config
from gams_worker.errors import ConfigError, WorkerError

service = None  # the process's GenerationService, set in main()


async def handler(job):
    outputs = service.run(job)
    close_when_cancelled(outputs)  # a stopped job frees its engine request at once
    async for output in outputs:
        yield output


def main() -> int:
    global service
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"gams-worker: configuration error: {exc}", file=sys.stderr, flush=True)
        return 2

    from gams_worker.platform.local_run import run_local, wants_local_run
    from gams_worker.startup.worker import setup_logging, start_worker

    setup_logging(config)
    try:
        # The job loop's SDK takes seconds to import: done while this process waits for vLLM's engine.
        worker = start_worker(config, import_while_engine_starts=("runpod",))
    except WorkerError as exc:  # engine start failed for a classified cause, or no model
        print(f"gams-worker: {exc}", file=sys.stderr, flush=True)
        return 1
    service = worker.service
    import runpod
    try:
        if wants_local_run(sys.argv, config.on_runpod):
            return run_local(handler, sys.argv)
        from gams_worker.platform.job_loop import use_prompt_job_scaler

        use_prompt_job_scaler()  # the SDK's loop, but taken jobs start at once, not within 100 ms
        runpod.serverless.start({
            "handler": handler,
            "concurrency_modifier": lambda current: worker.concurrency,
            "return_aggregate_stream": True,
        })
        return 0
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main())
