"""RunPod serverless worker for the Slovene LLM GaMS, served by vLLM: one engine per process, shared
by all jobs, created under the __main__ guard (vLLM's engine core re-imports this file)."""

import os
import signal
import sys


def _stop_during_startup(signum, frame):
    # Until the SDK's job loop installs its own handler, a SIGTERM ends the start-up at once (as PID 1,
    # Python would ignore it). A start has nothing to save: the engine's processes are killed rather
    # than asked to stop (vLLM waits seconds for one busy compiling); the next start sets aside a
    # damaged compile cache. The line goes to the stderr the process started with: the engine start
    # tees fd 2 through a pipe whose last lines would not reach the log before this exit.
    os.write(_STDERR, b"gams-worker: SIGTERM during start-up: stopping\n")
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:  # gone already
            pass
    os._exit(128 + signum)


def _sigterm_as_default_in_child():
    # The SDK forks its heartbeat process before its job loop installs its own handler, and ends it
    # with SIGTERM at the worker's exit: it must not print the start-up's stop line.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":  # not in vLLM's engine process, which imports this file as __mp_main__
    _STDERR = os.dup(2)
    signal.signal(signal.SIGTERM, _stop_during_startup)  # first, before the slow imports below
    os.register_at_fork(after_in_child=_sigterm_as_default_in_child)

from gams_worker.config import load_config  # noqa: E402
from gams_worker.errors import ConfigError, WorkerError  # noqa: E402
from gams_worker.platform.unreadable import UnreadableJob  # noqa: E402

worker = None  # the process's Worker (gams_worker/worker.py), set in serve()


async def handler(job):
    outputs = job.outputs() if isinstance(job, UnreadableJob) else worker.run(job)
    async for output in outputs:
        yield output


def main() -> int:
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"gams-worker: configuration error: {exc}", file=sys.stderr, flush=True)
        return 2

    endpoint = None
    if config.endpoint_kind == "http":  # a load-balancing endpoint: /ping answers from now on
        from gams_worker.platform.http import HttpEndpoint

        try:
            endpoint = HttpEndpoint(config)
        except OSError as exc:  # the port is taken, or not ours to bind
            print(f"gams-worker: cannot serve HTTP on port {config.port}: {exc}", file=sys.stderr, flush=True)
            return 1
    from gams_worker.processes import end_process
    from gams_worker.worker import setup_logging

    setup_logging(config)
    end_process(serve(config, endpoint), run_exit_handlers=True)


def serve(config, endpoint=None) -> int:
    """Start the engine, then serve HTTP on ``endpoint``, or run the SDK's job loop (or one local job);
    return the exit status."""
    global worker
    from gams_worker.platform.local_run import wants_local_run
    from gams_worker.platform.sdk_version import check_sdk_version
    from gams_worker.startup.vllm_release import check_vllm_release
    from gams_worker.worker import start_worker

    local_run = endpoint is None and wants_local_run(sys.argv, config.on_runpod)
    try:
        check_vllm_release()  # the one vLLM release the worker is tested on, before anything imports it
        if endpoint is None and not local_run:
            check_sdk_version()  # refuse an SDK the job loop was not written for before the engine starts
        # The job loop's SDK takes seconds to import: done while this process waits for vLLM's engine.
        worker = start_worker(config, imports_during_start=() if endpoint else ("runpod",))
    except WorkerError as exc:  # the wrong vLLM or SDK, a classified start failure, or no model
        print(f"gams-worker: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        return endpoint.serve(worker) if endpoint else serve_queue(local_run)
    finally:
        worker.close()


def serve_queue(local_run: bool) -> int:
    """The SDK's job loop, taking jobs up to the concurrency and starting them at once (or one local job)."""
    import runpod
    from gams_worker.platform.local_run import run_local

    if local_run:
        return run_local(handler, sys.argv)
    from gams_worker.platform.job_loop import install_job_loop

    install_job_loop()
    runpod.serverless.start({
        "handler": handler,
        "concurrency_modifier": lambda current: worker.concurrency,
        "return_aggregate_stream": True,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
