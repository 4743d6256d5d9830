"""Start-up of the worker process: logging, engine, tokenizer, and the engine watchdog."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

from gams_worker.config import WorkerConfig
from gams_worker.engine import EngineInfo, platform_name, start_engine
from gams_worker.service import GenerationService

log = logging.getLogger(__name__)

# Seconds a dead engine's in-flight jobs get to post their errors before the process exits.
DEAD_ENGINE_GRACE_S = 1.0


def setup_logging(config: WorkerConfig) -> None:
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # a library imported earlier may have configured the root logger
    )


class EngineWatchdog:
    """Exits the process non-zero once the engine is dead, so RunPod replaces the worker.

    A dead vLLM engine never recovers; a worker that stayed up with it would take
    jobs only to fail them. ``stop()`` before a clean shutdown, which also ends the engine.
    """

    def __init__(self, engine: Any, interval_s: float = 0.5):
        self._engine = engine
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(self._interval_s):
            if self._engine.errored:
                break
        if self._stopped.is_set():
            return
        log.critical("the vLLM engine is dead; exiting with status 1 so RunPod replaces this worker")
        time.sleep(DEAD_ENGINE_GRACE_S)
        logging.shutdown()
        os._exit(1)


class Worker:
    """The engine, the service running jobs on it, and the watchdog over both."""

    def __init__(self, service: GenerationService):
        self.service = service
        self.watchdog = EngineWatchdog(service.engine)

    def close(self) -> None:
        self.watchdog.stop()
        self.service.engine.shutdown()


def start_worker(config: WorkerConfig) -> Worker:
    """Start the one engine of this process and the service that runs jobs on it."""
    from transformers import AutoTokenizer

    started = time.monotonic()
    model_path = config.model_name
    mode = "eager" if config.enforce_eager else "full"
    reason = "ENFORCE_EAGER is set" if config.enforce_eager else "default"
    engine = start_engine(config, mode, model_path)
    tokenizer = AutoTokenizer.from_pretrained(
        config.tokenizer_name or model_path,
        revision=config.model_revision,
        trust_remote_code=config.trust_remote_code,
    )
    info = EngineInfo(mode=mode, reason=reason, platform=platform_name(),
                      start_seconds=round(time.monotonic() - started, 2))
    log.info("worker ready: model %s, engine %s", config.model_label, info)
    return Worker(GenerationService(engine, tokenizer, config, info))
