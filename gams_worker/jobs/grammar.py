"""Structured-output grammars compiled with vLLM's own backend within a deadline, before the engine (which
has none) gets them: a constraint that does not compile, or not in time, is refused naming its field;
runaway compiles delay other grammars, never other jobs (MAINTAINERS.md, "The OpenAI layer")."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict

from gams_worker.errors import JobInputError

log = logging.getLogger(__name__)


class GrammarGate:
    """Compiles constraints with the engine's own backend, off the event loop, with a deadline."""

    def __init__(self, engine: Any, tokenizer: Any, timeout_s: float):
        self._engine = engine
        self._tokenizer = tokenizer  # a copy of the engine's: vLLM's serving threads change the engine's
        self.timeout_s = timeout_s  # 0: no compile here (the engine alone compiles, without a limit)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-compile")  # compiles at once
        self._backends: Dict[str, Any] = {}  # backend name -> vLLM StructuredOutputBackend
        self._backends_lock = threading.Lock()
        if timeout_s > 0:  # the first backend reads the whole vocabulary: not on a job's clock
            threading.Thread(target=self._backend, args=("xgrammar",), name="grammar-backend", daemon=True).start()

    async def check(self, constraint: Any, field: str) -> None:
        """JobInputError naming ``field`` unless ``constraint`` (the request's, or None) compiles in time."""
        if constraint is None or self.timeout_s <= 0:
            return
        started = time.monotonic()
        future = self._executor.submit(self._compile, dataclasses.replace(constraint))  # verify() changes it
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except asyncio.TimeoutError:
            log.warning("a %s grammar did not compile within %.1f s: refused; its compile goes on in its thread",
                        field, self.timeout_s)
            raise JobInputError(
                f"did not compile as a grammar within GRAMMAR_COMPILE_TIMEOUT_S={self.timeout_s:g} s (waiting for "
                f"a compile slot included); make the schema or pattern smaller or simpler", field) from None
        except Exception as exc:  # vLLM's validation or the backend refused it
            raise JobInputError(f"does not compile as a grammar: {type(exc).__name__}: {exc}", field) from None
        log.debug("%s grammar compiled in %.3f s", field, time.monotonic() - started)

    def _compile(self, constraint: Any) -> None:
        from vllm import SamplingParams
        from vllm.v1.structured_output.request import get_structured_output_key

        engine = self._engine
        params = SamplingParams(max_tokens=1, structured_outputs=constraint)
        # What the engine's input processor runs on every request (it picks the backend).
        params.verify(engine.model_config, engine.vllm_config.speculative_config,
                      engine.vllm_config.structured_outputs_config, self._tokenizer)
        backend = self._backend(params.structured_outputs._backend)
        if backend is not None:
            backend.compile_grammar(*get_structured_output_key(params.structured_outputs))

    def _backend(self, name: str) -> Any:
        """vLLM's backend class of that name, built once (None: one this gate does not know)."""
        from vllm.v1.structured_output.backend_guidance import GuidanceBackend
        from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

        backend_classes = {"xgrammar": XgrammarBackend, "guidance": GuidanceBackend}
        with self._backends_lock:
            if name not in self._backends:
                backend_class, backend = backend_classes.get(name), None
                if backend_class is None:  # outlines, lm-format-enforcer: only where an operator chose them
                    log.warning("structured-output backend %r is compiled by the engine alone, without a deadline",
                                name)
                else:
                    backend = backend_class(vllm_config=self._engine.vllm_config, tokenizer=self._tokenizer,
                                            vocab_size=self._engine.model_config.get_vocab_size())
                self._backends[name] = backend
            return self._backends[name]
