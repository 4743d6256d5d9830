"""The composition root: the one place that builds the worker process from startup/, jobs/ and platform/.

``start_worker`` starts the process's one engine and hands it to a ``Worker``, which builds the jobs
of both dialects, the watchdog and the status endpoint on it; handler.py runs the SDK's job loop over
``Worker.jobs``. Nothing else builds these parts or reaches into them (tests/test_layout.py).
"""

from __future__ import annotations

import atexit
import copy
import functools
import gc
import importlib
import logging
import os
import sys
import time
from typing import Any, NoReturn, Optional, Sequence

from gams_worker.config import WorkerConfig
from gams_worker.jobs.chat_template import log_chat_template, probe_chat_template
from gams_worker.jobs.openai import OpenAIJobs
from gams_worker.jobs.plain import PlainJobs
from gams_worker.jobs.dialects import JobDispatch
from gams_worker.jobs.streaming import FlushPolicy
from gams_worker.platform.status import StatusServer, worker_status
from gams_worker.startup.concurrency import job_concurrency
from gams_worker.startup.engine import EngineInfo, EngineStatsLog, import_engine_classes, start_engine
from gams_worker.startup.host import platform_name
from gams_worker.startup.ladder import StartedEngine, start_with_fallback
from gams_worker.startup.liveness import EngineWatchdog, StartDeadline, StepClock
from gams_worker.startup.model import ResolvedModel, find_local_model
from gams_worker.startup.plan import EnginePlan, plan_engine
from gams_worker.startup.timeline import WEIGHTS_LOADING, StartupTimeline
from gams_worker.startup.weight_prefetch import WeightPrefetch, plan_weight_prefetch
from gams_worker.startup.while_engine_starts import WhileEngineStarts, freeze_startup_heap

log = logging.getLogger(__name__)


def setup_logging(config: WorkerConfig) -> None:
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # a library imported earlier may have configured the root logger
    )


def exit_quietly(status: int) -> NoReturn:
    """End the process once the worker is closed: run the exit handlers, skip the interpreter's teardown.

    The teardown adds only noise to a clean end: vLLM's AsyncLLM.__del__ calls its shutdown
    again once module globals are gone ("Exception ignored in ... TypeError"), and Triton's
    nanobind extension lists every object still alive as "leaked" (about 60 lines). What
    exiting does that matters (flushing the logs, ending the runpod SDK's heartbeat process)
    is done by the atexit handlers, run here as Python would run them.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class Worker:
    """The process's engine and its model's facts, the jobs on it (both dialects), and the watchdog over them."""

    def __init__(self, engine: Any, config: WorkerConfig, engine_info: EngineInfo, concurrency: int,
                 startup: Optional[StartupTimeline] = None, step_clock: Optional[StepClock] = None,
                 engine_pids: Sequence[int] = ()):
        self.engine = engine
        self.config = config  # with the preset applied and max_num_seqs sized
        self.engine_info = engine_info  # reported with every plain job
        self.concurrency = concurrency  # jobs RunPod may send at once (concurrency_modifier)
        self.tokenizer = engine.get_tokenizer()  # the engine's own: loading it again would cost seconds
        # What the chat template does (end-of-turn token, system role), for both dialects.
        self.chat_template = probe_chat_template(self.tokenizer)
        log_chat_template(engine, self.tokenizer, self.chat_template)
        # The worker's own input work (plain jobs' prompts, grammar compiles) uses a tokenizer of its
        # own, in threads of its own: vLLM's serving layer tokenizes OpenAI jobs in its threads with the
        # engine's tokenizer, changing its truncation settings per call, which a concurrent use of the
        # same tokenizer must not meet ("Already borrowed").
        self.input_tokenizer = copy.deepcopy(self.tokenizer)
        # The one flush policy of all streams, plain and OpenAI: its POST budget is the worker's.
        self.flush_policy = FlushPolicy(config.stream_batch_tokens, config.stream_batch_ms,
                                        config.stream_posts_per_second)
        log.info(self.flush_policy.summary())
        eos_token_id = self.tokenizer.eos_token_id
        plain = PlainJobs(engine, config, self.input_tokenizer, self.chat_template, eos_token_id, self.flush_policy,
                          engine_info, startup)
        openai = OpenAIJobs(engine, config, self.chat_template, self.flush_policy, self.input_tokenizer, eos_token_id)
        self.aborted = plain.aborted  # the latest plain jobs whose engine request was aborted
        self.jobs = JobDispatch(plain, openai, EngineStatsLog(engine) if config.log_engine_stats else None)
        self.watchdog = EngineWatchdog(engine, step_clock, config.engine_stall_timeout_s, engine_pids)
        self.status_server = StatusServer(self.status, config.status_port) if config.status_port else None

    def status(self) -> dict:
        """What the status endpoint reports (gams_worker/platform/status.py)."""
        return worker_status(self.engine, self.jobs.running_jobs, self.aborted)

    def close(self) -> None:
        self.watchdog.stop()  # first: the engine's shutdown below must not look like a crash
        if self.status_server:
            self.status_server.close()
        self.engine.shutdown()


def start_worker(config: WorkerConfig, import_while_engine_starts: Sequence[str] = ()) -> Worker:
    """Start the one engine of this process and the worker that runs jobs on it.

    ``import_while_engine_starts``: modules the caller needs after the start (the job loop's
    SDK), imported while this process only waits for vLLM's engine process (WhileEngineStarts).
    """
    started = time.monotonic()
    timeline = StartupTimeline()
    timeline.mark("config loaded")
    # Already on this machine (baked, or in a cache): None means resolve_model downloads it after the doctor.
    local_model = find_local_model(config)
    prefetch = plan_weight_prefetch(config, local_model.path) if local_model else None
    if prefetch is not None and config.prefetch_weights == "with-imports":
        prefetch.start()
    try:
        plan = _plan_after_imports(config, local_model, timeline, prefetch)
        engine = _start_engine(plan, timeline, prefetch, import_while_engine_starts)
    finally:
        _end_prefetch(prefetch, timeline)  # done already unless the start failed
    _read_engine_start(engine, plan, timeline)
    step_clock = StepClock()  # stamped by the engine's output, read by the watchdog
    step_clock.watch(engine.engine)
    info = EngineInfo(mode=engine.mode, reason=engine.reason, platform=platform_name(),
                      start_seconds=round(time.monotonic() - started, 2))
    worker = Worker(engine.engine, plan.config, info, job_concurrency(plan.config, engine.engine), timeline,
                    step_clock, sorted(engine.process_ids))
    timeline.mark("ready for jobs")
    log.info("worker ready: model %s, engine %s, start-up %s", plan.config.model_label, info, timeline.to_output())
    return worker


def _plan_after_imports(config: WorkerConfig, local_model: Optional[ResolvedModel], timeline: StartupTimeline,
                        prefetch: Optional[WeightPrefetch]) -> EnginePlan:
    """torch and vLLM's engine classes take most of the time before the engine can start: each
    is a step of its own, and the engine plan after them (its doctor) finds them imported."""
    import torch  # noqa: F401

    timeline.mark("torch imported")
    import_engine_classes()
    timeline.mark("vLLM engine classes imported")
    if prefetch is not None and config.prefetch_weights == "after-imports":
        prefetch.start()
    return plan_engine(config, local_model, timeline.mark)


def _start_engine(plan: EnginePlan, timeline: StartupTimeline, prefetch: Optional[WeightPrefetch],
                  import_while_engine_starts: Sequence[str]) -> StartedEngine:
    """The engine, started down the fallback ladder within ENGINE_START_TIMEOUT_S, while this
    process imports what the caller asked for and collects its start-up garbage."""
    config = plan.config

    def watch_engine_line(line: str, arrived_at: float) -> None:
        if timeline.watch_engine_line(line, arrived_at) == WEIGHTS_LOADING and prefetch is not None:
            prefetch.stop("vLLM started loading the weights")  # from here on vLLM reads them itself

    background = WhileEngineStarts(
        [(f"{name} imported", functools.partial(importlib.import_module, name)) for name in import_while_engine_starts]
        + [("start-up garbage collected", gc.collect)], timeline)
    try:
        engine = start_with_fallback(
            config, plan.mode, plan.reason, lambda mode: start_engine(config, mode, plan.model_path),
            on_output_line=watch_engine_line, compile_cache=plan.compile_cache,
            deadline=StartDeadline(config.engine_start_timeout_s))
    except BaseException:
        background.finish(run_the_rest=False)
        raise
    finally:
        _end_prefetch(prefetch, timeline)
    timeline.mark("engine started")
    timeline.stop_watching()
    background.finish()  # done by now unless the engine started in under a second or two
    return engine


def _read_engine_start(engine: StartedEngine, plan: EnginePlan, timeline: StartupTimeline) -> None:
    """After a start: the heap frozen, and the timeline's read of the engine's output and compile cache."""
    freeze_startup_heap(fell_back=engine.mode != plan.mode)  # not on failure: nothing outlives a failed start
    timeline.read_engine_output(engine.output)
    timeline.compile_cache = (engine.compile_cache or plan.compile_cache).report(engine.output)
    timeline.mark("compile cache counted")


def _end_prefetch(prefetch: Optional[WeightPrefetch], timeline: StartupTimeline) -> None:
    if prefetch is None or "weight_prefetch" in timeline.details:
        return
    prefetch.stop("the engine start ended")
    prefetch.wait(timeout=5.0)  # at most one chunk is still being read
    timeline.details["weight_prefetch"] = prefetch.report()
