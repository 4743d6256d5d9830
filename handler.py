"""RunPod serverless worker for the Slovene LLM GaMS, served by vLLM.

One vLLM engine per process, created before the job loop and shared by all jobs.
Engine creation stays under the __main__ guard: vLLM spawns its engine core as a
child process that re-imports this file.
"""

import signal
import sys


def _stop_during_startup(signum, frame):
    # Until the SDK's job loop installs its own handler (which lets jobs in flight finish), a
    # SIGTERM ends the start-up at once: as PID 1 in a container, Python would ignore it.
    # SystemExit unwinds the engine start, whose clean-up ends vLLM's engine process.
    print("gams-worker: SIGTERM during start-up: stopping", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


if __name__ == "__main__":  # not in vLLM's engine process, which imports this file as __mp_main__
    signal.signal(signal.SIGTERM, _stop_during_startup)  # first, before the slow imports below

import importlib  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from gams_worker.platform.cancellation import close_when_cancelled  # noqa: E402
from gams_worker.config import load_config  # noqa: E402
from gams_worker.errors import ConfigError, WorkerError  # noqa: E402

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
    # The job loop's SDK takes seconds to import: do it while the engine starts.
    runpod_import = ThreadPoolExecutor(max_workers=1).submit(importlib.import_module, "runpod")
    try:
        worker = start_worker(config)
    except WorkerError as exc:  # engine start failed for a classified cause, or no model
        print(f"gams-worker: {exc}", file=sys.stderr, flush=True)
        return 1
    service = worker.service
    runpod = runpod_import.result()
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
