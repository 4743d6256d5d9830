"""Start-up of the worker process: logging, engine, tokenizer, and the engine watchdog (startup/liveness.py)."""

from __future__ import annotations

import atexit
import functools
import gc
import importlib
import logging
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, NoReturn, Optional, Sequence, Set, Tuple

from gams_worker.startup.compile_cache import CompileCache, choose_compile_cache
from gams_worker.startup.concurrency import concurrency_bound, derive_concurrency, kv_capacity, size_max_num_seqs
from gams_worker.config import WorkerConfig, export_to_engine
from gams_worker.startup.doctor import DoctorReport, run_doctor
from gams_worker.memory import ModelMemory, model_memory
from gams_worker.startup.host import HostFacts, host_facts, platform_name
from gams_worker.startup.engine import EngineInfo, EngineStatsLog, import_engine_classes, start_engine
from gams_worker.errors import EngineStartError
from gams_worker.startup.ladder import start_with_fallback
from gams_worker.startup.liveness import EngineWatchdog, StartDeadline, StepClock
from gams_worker.startup.model import BAKED, ResolvedModel, find_local_model, resolve_model
from gams_worker.startup.plan import apply_preset, kv_summary
from gams_worker.jobs.openai import OpenAIRoutes
from gams_worker.jobs.route import JobRouter
from gams_worker.jobs.service import GenerationService
from gams_worker.platform.status import StatusServer
from gams_worker.startup.timeline import WEIGHTS_LOADING, StartupTimeline
from gams_worker.startup.weight_prefetch import WeightPrefetch, plan_weight_prefetch

log = logging.getLogger(__name__)

# Jobs taken at once when neither MAX_CONCURRENCY nor the engine's KV cache size says.
DEFAULT_CONCURRENCY = 32
BAKED_MODEL_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


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
    """The engine, the jobs running on it (both dialects), and the watchdog over both."""

    def __init__(self, service: GenerationService, concurrency: int, step_clock: Optional[StepClock] = None,
                 engine_pids: Sequence[int] = ()):
        self.service = service  # plain jobs
        openai = OpenAIRoutes(service.engine, service.config, service.chat_template, service.flush_policy,
                              service.input_tokenizer)
        stats_log = EngineStatsLog(service.engine) if service.config.log_engine_stats else None
        self.jobs = JobRouter(service, openai, stats_log)
        self.concurrency = concurrency  # jobs RunPod may send at once (concurrency_modifier)
        self.watchdog = EngineWatchdog(service.engine, step_clock, service.config.engine_stall_timeout_s, engine_pids)
        port = service.config.status_port
        self.status_server = StatusServer(self.jobs, port) if port else None

    def close(self) -> None:
        self.watchdog.stop()  # first: the engine's shutdown below must not look like a crash
        if self.status_server:
            self.status_server.close()
        self.service.engine.shutdown()


def first_rung(config: WorkerConfig, report: DoctorReport) -> Tuple[str, str]:
    """The graph mode the engine starts in, and why."""
    if config.enforce_eager:
        return "eager", "ENFORCE_EAGER is set"
    if report.start_mode:
        return report.start_mode, report.start_reason
    return "full", "default"


@dataclass(frozen=True)
class EnginePlan:
    """What the engine starts with, decided before it starts."""

    config: WorkerConfig  # with the preset applied
    mode: str  # the first graph mode of the fallback ladder
    reason: str
    model_path: str
    compile_cache: CompileCache


def plan_engine(config: WorkerConfig, local_model: Optional[ResolvedModel],
                mark: Callable[[str], None] = lambda step: None) -> EnginePlan:
    """Preset, doctor, model and compile cache, in that order; sets the environment vLLM's
    engine process inherits. ``mark`` stamps each step on the start-up timeline."""
    facts = host_facts()
    gpu_memory_gib = facts.gpus[0].total_gib if facts.gpus else None
    config, sources = apply_preset(config, len(facts.gpus), gpu_memory_gib)
    log.info("settings: %s", ", ".join(f"{name}={getattr(config, name)} ({source})" for name, source in sources.items()))
    kv_line = kv_summary(config, len(facts.gpus), gpu_memory_gib)  # GaMS presets only
    if kv_line:
        log.info(kv_line)
    report = run_doctor(config, facts, local_model.path if local_model else None)
    if report.blocking:
        problems = "; ".join(report.blocking)
        raise EngineStartError(f"the doctor found problems no engine start gets past: {problems}", problems)
    mode, reason = first_rung(config, report)
    mark("doctor done")
    model = resolve_model(config)  # baked copy, then caches, then the hub
    if model.source == BAKED:
        # A baked copy is whole: nothing may reach for the hub (RunPod's worker-vllm sets the same).
        # vLLM's engine process, which loads the model, inherits them.
        export_to_engine(BAKED_MODEL_OFFLINE)
        log.info("serving the baked copy: %s", " ".join(f"{k}={v}" for k, v in BAKED_MODEL_OFFLINE.items()))
    mark("model resolved")
    # The doctor read the model's memory where it was here already; a download is read now.
    config = with_max_num_seqs(config, facts, report.memory or model_memory(model.path, config.dtype, config.tensor_parallel_size))
    compile_cache = choose_compile_cache(config, facts)
    export_to_engine(compile_cache.engine_environment())
    mark("compile cache checked")
    return EnginePlan(config, mode, reason, model.path, compile_cache)


def start_worker(config: WorkerConfig, import_while_engine_starts: Sequence[str] = ()) -> Worker:
    """Start the one engine of this process and the service that runs jobs on it.

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
        return _start(config, local_model, timeline, prefetch, import_while_engine_starts, started)
    finally:
        _end_prefetch(prefetch, timeline)  # done already unless the start failed


def _start(config: WorkerConfig, local_model: Optional[ResolvedModel], timeline: StartupTimeline,
           prefetch: Optional[WeightPrefetch], import_while_engine_starts: Sequence[str], started: float) -> Worker:
    # torch and vLLM's engine classes take most of the time before the engine can start:
    # each is a step of its own, and the doctor after them finds them imported.
    import torch  # noqa: F401

    timeline.mark("torch imported")
    import_engine_classes()
    timeline.mark("vLLM engine classes imported")
    if prefetch is not None and config.prefetch_weights == "after-imports":
        prefetch.start()
    plan = plan_engine(config, local_model, timeline.mark)
    config, mode, reason, compile_cache = plan.config, plan.mode, plan.reason, plan.compile_cache
    started_mode = mode

    def watch_engine_line(line: str, arrived_at: float) -> None:
        if timeline.watch_engine_line(line, arrived_at) == WEIGHTS_LOADING and prefetch is not None:
            prefetch.stop("vLLM started loading the weights")  # from here on vLLM reads them itself

    background = WhileEngineStarts(
        [(f"{name} imported", functools.partial(importlib.import_module, name)) for name in import_while_engine_starts]
        + [("start-up garbage collected", gc.collect)], timeline)
    try:
        started_engine = start_with_fallback(
            config, mode, reason, lambda m: start_engine(config, m, plan.model_path),
            on_output_line=watch_engine_line, compile_cache=compile_cache,
            deadline=StartDeadline(config.engine_start_timeout_s))
    except BaseException:
        background.finish(run_the_rest=False)
        raise
    finally:
        _end_prefetch(prefetch, timeline)
    timeline.mark("engine started")
    timeline.stop_watching()
    background.finish()  # done by now unless the engine started in under a second or two
    engine, mode, reason = started_engine.engine, started_engine.mode, started_engine.reason
    freeze_startup_heap(fell_back=mode != started_mode)  # not on failure: nothing outlives a failed start
    timeline.read_engine_output(started_engine.output)
    timeline.compile_cache = (started_engine.compile_cache or compile_cache).report(started_engine.output)
    timeline.mark("compile cache counted")
    step_clock = StepClock()  # stamped by the engine's output, read by the watchdog
    step_clock.watch(engine)
    tokenizer = engine.get_tokenizer()  # the engine's own: loading it again would cost seconds
    info = EngineInfo(mode=mode, reason=reason, platform=platform_name(),
                      start_seconds=round(time.monotonic() - started, 2))
    worker = Worker(GenerationService(engine, tokenizer, config, info, timeline), job_concurrency(config, engine),
                    step_clock, sorted(started_engine.process_ids))
    timeline.mark("ready for jobs")
    log.info("worker ready: model %s, engine %s, start-up %s", config.model_label, info, timeline.to_output())
    return worker


def _end_prefetch(prefetch: Optional[WeightPrefetch], timeline: StartupTimeline) -> None:
    if prefetch is None or "weight_prefetch" in timeline.details:
        return
    prefetch.stop("the engine start ended")
    prefetch.wait(timeout=5.0)  # at most one chunk is still being read
    timeline.details["weight_prefetch"] = prefetch.report()


class WhileEngineStarts:
    """Runs start-up work in a thread once vLLM's engine process runs.

    Work that holds the GIL (an import, a garbage collection) delays the engine's start by its
    whole length when it runs beside vLLM's own imports and set-up in this process. Once the
    engine process runs, this process only waits for it, so the same work costs nothing.
    vLLM starts its engine process with multiprocessing; the thread looks for a new one every
    50 ms (subprocesses vLLM runs before, such as its model inspection, are not among them).
    """

    POLL_S = 0.05

    def __init__(self, tasks: Sequence[Tuple[str, Callable[[], Any]]], timeline: StartupTimeline):
        self.tasks = list(tasks)  # (the timeline mark when done, the work)
        self.timeline = timeline
        self._children_before = _engine_processes()
        self._released = threading.Event()  # set by finish(): run now, whatever runs
        self._skip_rest = False
        self._thread = threading.Thread(target=self._run, name="while-engine-starts", daemon=True)
        if self.tasks:
            self._thread.start()

    def finish(self, run_the_rest: bool = True) -> None:
        """The engine start ended: run what has not run (or skip it, after a failed start) and wait."""
        self._skip_rest = not run_the_rest
        self._released.set()
        if self.tasks:
            self._thread.join()

    def _run(self) -> None:
        while not self._released.wait(self.POLL_S):
            if _engine_processes() - self._children_before:
                break
        for done_mark, work in self.tasks:
            if self._skip_rest:
                return
            try:
                work()
            except Exception as exc:  # an import the caller repeats raises there, where it matters
                log.warning("%s: failed while the engine started: %r", done_mark, exc)
                continue
            self.timeline.mark(done_mark)


def freeze_startup_heap(fell_back: bool) -> None:
    """Keep full garbage collections from walking what start-up made (it lives as long as the
    process): they paused every stream for up to 0.36 s on CPU. vLLM's own server does the same.

    The collection before the freeze (0.4 s of CPU) ran while the engine started
    (WhileEngineStarts); a failed first attempt left garbage since, so it is collected again."""
    if fell_back:
        gc.collect()
    gc.freeze()


def _engine_processes() -> Set[int]:
    """Process ids of the live children that multiprocessing started (vLLM's engine core)."""
    return {child.pid for child in multiprocessing.active_children()}


def with_max_num_seqs(config: WorkerConfig, facts: HostFacts, memory: Optional[ModelMemory]) -> WorkerConfig:
    """``config`` with max_num_seqs sized for this GPU (gams_worker/startup/concurrency.py), logged with why;
    MAX_NUM_SEQS wins (the line then says what the sizing would have given)."""
    gpus = facts.gpus[: config.tensor_parallel_size]
    if not gpus or any(gpu.total_bytes is None for gpu in gpus):
        sized, why = None, "no GPU memory to size it from"
    elif memory is None:
        sized, why = None, "the model's memory is unknown: its config.json was not read"
    else:
        sized, why = size_max_num_seqs(memory, min(gpu.total_bytes for gpu in gpus), config.gpu_memory_utilization,
                                       config.expected_tokens_per_job)
    if config.max_num_seqs is not None:
        log.info("max_num_seqs: %d (MAX_NUM_SEQS; %s)", config.max_num_seqs,
                 f"sized, it would be {sized} = {why}" if sized else f"unsized: {why}")
        return config
    if sized is None:
        log.info("max_num_seqs: vLLM's default (%s)", why)
        return config
    log.info("max_num_seqs: %d = %s", sized, why)
    return replace(config, max_num_seqs=sized)


def job_concurrency(config: WorkerConfig, engine: Any) -> int:
    """Jobs this worker takes at once: MAX_CONCURRENCY, else sized from the engine's KV cache."""
    if config.max_concurrency is not None:
        log.info("concurrency: %d jobs (MAX_CONCURRENCY)", config.max_concurrency)
        return config.max_concurrency
    capacity = kv_capacity(engine)
    if capacity is None:
        log.info("concurrency: %d jobs (default; the engine reported no KV cache size)",
                 DEFAULT_CONCURRENCY)
        return DEFAULT_CONCURRENCY
    concurrency = derive_concurrency(capacity, config.expected_tokens_per_job)
    log.info("concurrency: %d jobs = KV cache %d tokens / EXPECTED_TOKENS_PER_JOB %d, at most max_num_seqs %d: %s",
             concurrency, capacity.kv_cache_tokens, config.expected_tokens_per_job, capacity.max_num_seqs,
             concurrency_bound(capacity, config.expected_tokens_per_job))
    return concurrency
