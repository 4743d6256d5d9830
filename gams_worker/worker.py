"""The composition root, the one place that builds the worker from startup/, serving/, jobs/ and platform/:
``start_worker`` starts the engine and hands it to a ``Worker``; handler.py serves jobs with ``Worker.run``."""

from __future__ import annotations

import copy
import functools
import gc
import importlib
import logging
import math
import sys
import time
from typing import Any, AsyncIterator, Callable, Dict, Optional, Sequence, Tuple

from gams_worker.config import WorkerConfig, export_to_engine
from gams_worker.engine_info import EngineInfo
from gams_worker.jobs.adapters import Adapters
from gams_worker.jobs.chat_template import log_chat_template, probe_chat_template
from gams_worker.jobs.dialects import JobDispatch
from gams_worker.jobs.openai import SERVING_MODULES, OpenAIJobs
from gams_worker.jobs.plain import PlainJobs
from gams_worker.jobs.streaming import FlushPolicy
from gams_worker.serving.concurrency import job_concurrency
from gams_worker.serving.stats_log import EngineStatsLog
from gams_worker.serving.status import StatusServer, worker_status
from gams_worker.serving.watchdog import EngineWatchdog, StepClock
from gams_worker.startup.deferred_work import DeferredWork, freeze_startup_heap
from gams_worker.startup.engine import import_engine_classes, start_engine
from gams_worker.startup.host import platform_name
from gams_worker.startup.ladder import StartedEngine, start_with_fallback
from gams_worker.startup.model import ResolvedModel, find_local_model
from gams_worker.startup.plan import EnginePlan, bad_words_budget, engine_ready_timeout, plan_engine
from gams_worker.startup.readahead import WeightsReadahead
from gams_worker.startup.start_deadline import StartDeadline
from gams_worker.startup.timeline import StartupTimeline

log = logging.getLogger(__name__)


def setup_logging(config: WorkerConfig) -> None:
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # a library imported earlier may have configured the root logger
    )


def flush_policy(config: WorkerConfig) -> FlushPolicy:
    """The queue's POST budget; over HTTP no POSTs: each event as generated, or every HTTP_STREAM_BATCH_MS."""
    if config.endpoint_kind == "http":
        batch_ms = config.http_stream_batch_ms
        log.info("HTTP streams: %s", f"events every {batch_ms} ms" if batch_ms else "each event as generated")
        return FlushPolicy(10**9 if batch_ms else 1, batch_ms, math.inf)
    policy = FlushPolicy(config.stream_batch_tokens, config.stream_batch_ms, config.stream_posts_per_second)
    log.info(policy.summary())
    return policy


class Worker:
    """The process's engine and its model's facts, the jobs on it (both dialects), and the serving-time
    parts over them: job concurrency, watchdog, stats log, status endpoint."""

    def __init__(self, engine: Any, config: WorkerConfig, engine_info: EngineInfo,
                 startup: Optional[StartupTimeline] = None, engine_pids: Sequence[int] = (),
                 lora_modules: Sequence[Any] = (), input_tokenizer: Any = None):
        self.engine = engine
        self.config = config  # with the preset applied and max_num_seqs sized
        self.concurrency = job_concurrency(config, engine)  # jobs RunPod may send at once
        clock = StepClock()  # stamped by the engine's output from its first request on, read by the watchdog
        clock.watch(engine)
        self.tokenizer = engine.get_tokenizer()  # the engine's own: loading it again would cost seconds
        self.chat_template = probe_chat_template(self.tokenizer)  # end of turn, system role: both dialects
        log_chat_template(engine, self.tokenizer, self.chat_template)
        # Plain jobs' prompts and grammar compiles use a copy, in threads of their own: vLLM's serving
        # layer changes the engine's tokenizer's truncation per call, in its threads ("Already borrowed").
        # Loaded while the engine started where it could be (a copy of a 256k vocabulary takes a second).
        self.input_tokenizer = input_tokenizer or copy.deepcopy(self.tokenizer)
        self.flush_policy = flush_policy(config)  # one for all streams, both dialects
        eos_token_id = self.tokenizer.eos_token_id
        openai = OpenAIJobs(engine, config, self.chat_template, self.flush_policy, self.input_tokenizer, eos_token_id,
                            lora_modules)
        adapters = Adapters([module.name for module in lora_modules], (config.model_label, config.model_name),
                            openai.serving_models)
        plain = PlainJobs(engine, config, self.input_tokenizer, self.chat_template, eos_token_id, self.flush_policy,
                          engine_info, startup, adapters)
        self.aborted = plain.aborted  # the latest plain jobs whose engine request was aborted
        self.jobs = JobDispatch(plain, openai)
        self.stats_log = EngineStatsLog(engine) if config.log_engine_stats else None
        self.watchdog = EngineWatchdog(engine, clock, config.engine_stall_timeout_s, engine_pids)
        self.status_server = StatusServer(self.status, config.status_port) if config.status_port else None

    def run(self, job: Dict[str, Any]) -> AsyncIterator[Any]:
        """One job's outputs; serving begins with the first, in the loop that runs them all (the stats log's)."""
        if self.stats_log is not None:
            self.stats_log.start()
        return self.jobs.run(job)

    def status(self) -> dict:
        """What the status endpoint reports (gams_worker/serving/status.py)."""
        return worker_status(self.engine, self.jobs.running_jobs, self.aborted)

    def close(self) -> None:
        self.watchdog.stop()  # first: the engine's shutdown below must not look like a crash
        if self.status_server:
            self.status_server.close()
        self.engine.shutdown()


def start_worker(config: WorkerConfig, imports_during_start: Sequence[str] = ()) -> Worker:
    """Start the one engine of this process and the worker that runs jobs on it.

    ``imports_during_start``: modules the caller needs after the start (the job loop's
    SDK), imported with vLLM's OpenAI layer while this process only waits for vLLM's engine
    process (DeferredWork). The weights are read ahead during the imports before it.
    """
    started = time.monotonic()
    timeline = StartupTimeline()
    timeline.mark("config loaded")
    export_to_engine(engine_ready_timeout(config))  # one start deadline: vLLM's wait reads it at import
    export_to_engine(bad_words_budget(config))
    # Already on this machine (baked, or in a cache): None means resolve_model downloads it after the doctor.
    local_model = find_local_model(config)
    readahead = WeightsReadahead(local_model.path).start() if local_model else None
    input_tokenizer: Dict[str, Any] = {}
    try:
        plan = _plan_after_imports(config, local_model, timeline)
        if readahead:
            readahead.imports_done()
        side_work = [(f"{name} imported", functools.partial(importlib.import_module, name))
                     for name in (*imports_during_start, *SERVING_MODULES)]
        if _tokenizer_is_the_models(plan.config):
            side_work.append(("input tokenizer loaded", lambda: input_tokenizer.update(
                loaded=_load_tokenizer(plan.config, plan.model_path))))
        engine = _start_engine(plan, timeline, side_work)
    finally:
        if readahead:  # the engine holds the weights by now, or failed
            readahead.stop()
    _read_engine_start(engine, plan, timeline)
    info = EngineInfo(mode=engine.mode, reason=engine.reason, platform=platform_name(),
                      start_seconds=round(time.monotonic() - started, 2), plan=plan.card_plan)
    worker = Worker(engine.engine, plan.config, info, timeline, sorted(engine.process_ids), plan.adapters,
                    input_tokenizer.get("loaded"))
    timeline.mark("ready for jobs")
    log.info("worker ready: model %s, engine %s, start-up %s", plan.config.model_label, info, timeline.to_output())
    return worker


def _plan_after_imports(config: WorkerConfig, local_model: Optional[ResolvedModel],
                        timeline: StartupTimeline) -> EnginePlan:
    """torch and vLLM's engine classes take most of the time before the engine can start: each
    is a step of its own, and the engine plan after them (its doctor) finds them imported."""
    import torch  # noqa: F401

    timeline.mark("torch imported")
    import_engine_classes()
    timeline.mark("vLLM engine classes imported")
    return plan_engine(config, local_model, timeline.mark)


def _tokenizer_is_the_models(config: WorkerConfig) -> bool:
    """Whether vLLM loads the tokenizer from the model's folder with its defaults, as _load_tokenizer does."""
    engine_args = config.engine_args or {}
    return config.tokenizer_name is None and not {"tokenizer_mode", "tokenizer_revision"} & set(engine_args)


def _load_tokenizer(config: WorkerConfig, model_path: str) -> Any:
    """A tokenizer of its own for the job inputs, loaded and made thread-safe as vLLM makes the engine's
    (uncached: not the same object)."""
    from vllm.tokenizers import get_tokenizer
    from vllm.tokenizers.hf import maybe_make_thread_pool

    tokenizer = get_tokenizer(model_path, runner_type="generate", trust_remote_code=config.trust_remote_code)
    return maybe_make_thread_pool(tokenizer)


def _start_engine(plan: EnginePlan, timeline: StartupTimeline,
                  side_work: Sequence[Tuple[str, Callable[[], Any]]]) -> StartedEngine:
    """The engine, started down the fallback ladder within ENGINE_START_TIMEOUT_S, while this
    process does ``side_work`` (imports, the input tokenizer) and collects its start-up garbage."""
    config = plan.config
    background = DeferredWork([*side_work, ("start-up garbage collected", gc.collect)], timeline)
    try:
        engine = start_with_fallback(
            config, plan.mode, plan.reason, lambda mode: start_engine(config, mode, plan.model_path),
            on_output_line=timeline.watch_engine_line, compile_cache=plan.compile_cache,
            deadline=StartDeadline(config.engine_start_timeout_s))
    except BaseException:
        background.finish(run_the_rest=False)
        raise
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

