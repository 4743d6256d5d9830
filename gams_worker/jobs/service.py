"""Running one plain job on the shared engine: validate, generate, stream, report.

Output shapes (every job ends with exactly one item carrying ``usage``, or one error):

    stream:     {"choices": [{"index": 0, "text": "..."}]} ...
                last: {"choices": [{"index", "text", "finish_reason"}], "usage": {...}, "engine": {...}}
    non-stream: one item shaped like the last chunk, with the whole text
    error:      {"error": "<JSON of {"type", "message", "field"?}>"} (gams_worker/errors.py)
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Deque, Dict, List, Optional, Tuple

from gams_worker.config import WorkerConfig
from gams_worker.errors import ENGINE_DEAD, ENGINE_ERROR, INVALID_INPUT, JobInputError, error_output
from gams_worker.jobs.chat import PreparedPrompt, prepare_prompt
from gams_worker.jobs.chat_template import log_chat_template, probe_chat_template, stop_at_end_of_turn
from gams_worker.jobs.input import JobInput, parse_job_input
from gams_worker.jobs.streaming import FlushPolicy, StreamBatcher, text_by_choice

log = logging.getLogger(__name__)


class GenerationService:
    """Turns RunPod jobs into requests on one shared vLLM engine."""

    def __init__(self, engine: Any, tokenizer: Any, config: WorkerConfig, engine_info: Any, startup: Any = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.engine_info = engine_info  # startup.engine.EngineInfo, reported with every job
        self.startup = startup  # startup.timeline.StartupTimeline, reported once, with the first job served
        # (job id, time.monotonic()) of the latest requests aborted before they finished: a
        # stopped job's abort time, measured where it happens (the status endpoint reports it).
        self.aborted: Deque[Tuple[str, float]] = deque(maxlen=100)
        # What the chat template does (end-of-turn token, system role), for both dialects.
        self.chat_template = probe_chat_template(tokenizer)
        # The worker's own input work (plain jobs' prompts, grammar compiles) uses a tokenizer of its
        # own, in threads of its own: vLLM's serving layer tokenizes OpenAI jobs in its threads with the
        # engine's tokenizer, changing its truncation settings per call, which a concurrent use of the
        # same tokenizer must not meet ("Already borrowed"). Plain jobs are prepared one at a time.
        self.input_tokenizer = copy.deepcopy(tokenizer)
        self._prepare_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plain-job-input")
        log_chat_template(engine, tokenizer, self.chat_template)
        # The one flush policy of all streams, plain and OpenAI: its POST budget is the worker's.
        self.flush_policy = FlushPolicy(config.stream_batch_tokens, config.stream_batch_ms,
                                        config.stream_posts_per_second)
        log.info(self.flush_policy.summary())

    async def run(self, job: Dict[str, Any]) -> AsyncIterator[Dict[str, Any]]:
        """Yield the outputs of one job (see the module docstring for their shapes)."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            # Validation, the chat template and tokenization take up to ~0.5 s for the longest
            # prompts: in a thread, so that no other job's stream waits for them.
            job_input, prompt, params = await asyncio.get_running_loop().run_in_executor(
                self._prepare_thread, self._prepare, job.get("input"))
        except JobInputError as exc:
            yield exc.to_output()
            return
        except ValueError as exc:  # vLLM's own checks of sampling parameters
            yield error_output(INVALID_INPUT, str(exc), "sampling_params")
            return

        request_id = f"{job.get('id', 'job')}-{uuid.uuid4().hex[:8]}"
        batcher: StreamBatcher = self.flush_policy.stream()
        texts: Dict[int, List[str]] = {}
        finish: Dict[int, Optional[str]] = {}
        completion_tokens = 0
        started = time.monotonic()
        first_token_at: Optional[float] = None
        finished = False
        try:
            stream = self.engine.generate({"prompt_token_ids": prompt.token_ids}, params, request_id)
            async for output in stream:  # once per engine step: keep this loop lean
                for choice in output.outputs:
                    num_tokens = len(choice.token_ids)
                    completion_tokens += num_tokens
                    if first_token_at is None and num_tokens:
                        first_token_at = time.monotonic()
                    if choice.finish_reason is not None:
                        finish[choice.index] = choice.finish_reason
                    if job_input.stream:
                        ready = batcher.add((choice.index, choice.text), num_tokens, bool(choice.text))
                        if ready:
                            yield {"choices": [{"index": i, "text": t}
                                               for i, t in sorted(text_by_choice(ready).items())]}
                    else:
                        texts.setdefault(choice.index, []).append(choice.text)
                finished = output.finished
        except EngineDeadError as exc:
            log.error("job %s failed: the vLLM engine is dead (%s)", job.get("id"), exc)
            yield error_output(ENGINE_DEAD, "the inference engine died; this worker is being replaced")
            return
        except Exception as exc:  # a request-level engine error fails this job only
            log.exception("job %s failed in the engine", job.get("id"))
            yield error_output(ENGINE_ERROR, f"{type(exc).__name__}: {exc}")
            return
        finally:
            batcher.close()
            if not finished:  # cancelled or failed: free the KV cache and batch slot now
                await self.engine.abort(request_id)
                self.aborted.append((job.get("id"), time.monotonic()))
                log.info("job %s ended before its request finished: engine request aborted after %d tokens",
                         job.get("id"), completion_tokens)

        # A finished request has a finish reason for every choice.
        pending = text_by_choice(batcher.drain())
        choices = [
            {
                "index": i,
                "text": pending.get(i, "") if job_input.stream else "".join(texts.get(i, [])),
                "finish_reason": reason,
            }
            for i, reason in sorted(finish.items())
        ]
        ended = time.monotonic()
        yield {
            "choices": choices,
            "usage": {
                "prompt_tokens": len(prompt.token_ids),
                "completion_tokens": completion_tokens,
                "time_to_first_token_s": round((first_token_at or ended) - started, 4),
                "total_time_s": round(ended - started, 4),
                "tokens_per_second": round(completion_tokens / max(ended - started, 1e-9), 2),
            },
            "model": self.config.model_label,
            "engine": self.engine_info.to_output(),
            **self._startup_metadata_once(),
        }

    def _prepare(self, raw: Any) -> Tuple[JobInput, PreparedPrompt, Any]:
        """The job's input validated, its prompt as token ids, and its vLLM SamplingParams."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        job_input = parse_job_input(raw, self.config.default_max_tokens, self.config.input_limits)
        prompt = prepare_prompt(job_input, self.input_tokenizer, self.config.max_model_len, self.chat_template)
        params = SamplingParams(**prompt.sampling, output_kind=RequestOutputKind.DELTA)
        if job_input.messages is not None:
            stop_at_end_of_turn(params, self.chat_template, self.tokenizer.eos_token_id)
        return job_input, prompt, params

    def _startup_metadata_once(self) -> Dict[str, Any]:
        """The start-up timeline, in the first served job's output only."""
        if self.startup is None:
            return {}
        startup, self.startup = self.startup, None
        startup.mark("first job served")
        return {"startup": startup.to_output()}
