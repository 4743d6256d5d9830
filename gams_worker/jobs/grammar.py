"""Structured-output grammars compiled in the worker, with a deadline, before the engine gets them.

vLLM 0.32 compiles a request's grammar in its engine core (xgrammar, or guidance where xgrammar
refuses the schema), in a thread pool, while the request waits; a grammar that fails to compile
fails only its own request there, but nothing limits how long a compile runs: a grammar that
takes minutes holds its job that long and burns the engine core's CPU beside every other job.

So an OpenAI job's constraint (``response_format``, ``structured_outputs``, Responses ``text``)
is compiled here first, the way the engine will compile it: vLLM's own validation
(``SamplingParams.verify``, which picks the backend and converts the schema), then vLLM's own
backend class of that name, in a worker thread within GRAMMAR_COMPILE_TIMEOUT_S. xgrammar and
guidance release the GIL while they compile, so the event loop and every other job's stream go
on meanwhile. A constraint that does not compile, or not in time, is refused naming its field;
only one that compiled reaches the engine, which compiles it again (its process has its own
cache): a structured job pays its compile twice, the price of the deadline.

A compile past its deadline cannot be stopped (it is native code): it finishes in its thread.
At most COMPILES_AT_ONCE run at a time and the rest wait their turn within their own deadline,
so runaway grammars can delay other grammars, never other jobs.
"""

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

COMPILES_AT_ONCE = 2


class GrammarGate:
    """Compiles constraints with the engine's own backend, off the event loop, with a deadline."""

    def __init__(self, engine: Any, tokenizer: Any, timeout_s: float):
        self._engine = engine
        self._tokenizer = tokenizer  # a copy of the engine's: vLLM's serving threads change the engine's
        self.timeout_s = timeout_s  # 0: no compile here (the engine alone compiles, without a limit)
        self._executor = ThreadPoolExecutor(max_workers=COMPILES_AT_ONCE, thread_name_prefix="grammar-compile")
        self._backends: Dict[str, Any] = {}  # backend name -> vLLM StructuredOutputBackend
        self._backends_lock = threading.Lock()
        if timeout_s > 0:  # the first backend reads the whole vocabulary: not on a job's clock
            threading.Thread(target=self._backend, args=("xgrammar",), name="grammar-backend", daemon=True).start()

    async def check(self, constraint: Any, field: str) -> None:
        """JobInputError naming ``field`` unless ``constraint`` (vLLM's StructuredOutputsParams of
        the request, or None) compiles within the deadline."""
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
        with self._backends_lock:
            if name not in self._backends:
                self._backends[name] = _build_backend(name, self._engine, self._tokenizer)
            return self._backends[name]


def _build_backend(name: str, engine: Any, tokenizer: Any) -> Any:
    from vllm.v1.structured_output.backend_guidance import GuidanceBackend
    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

    backends = {"xgrammar": XgrammarBackend, "guidance": GuidanceBackend}
    if name not in backends:  # outlines, lm-format-enforcer: only where an operator chose them
        log.warning("structured-output backend %r is compiled by the engine alone, without a deadline", name)
        return None
    return backends[name](vllm_config=engine.vllm_config, tokenizer=tokenizer,
                          vocab_size=engine.model_config.get_vocab_size())
