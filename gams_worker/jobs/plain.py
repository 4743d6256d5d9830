"""Plain jobs on the shared engine: validate, generate, stream, report. Every job ends with exactly one
item carrying ``usage`` (stream chunks ``{"choices": [{"index", "text"}]}`` before it), or one error."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Deque, Dict, List, Optional, Tuple

from gams_worker.config import WorkerConfig
from gams_worker.engine_info import EngineInfo, StartupReport
from gams_worker.errors import ENGINE_DEAD, ENGINE_ERROR, INVALID_INPUT, JobInputError, error_output
from gams_worker.jobs.adapters import Adapters
from gams_worker.jobs.chat_template import ChatTemplateFacts, stop_at_end_of_turn
from gams_worker.jobs.input import JobInput, PreparedPrompt, parse_job_input, prepare_prompt
from gams_worker.jobs.streaming import FlushPolicy, StreamBatcher, text_by_choice

log = logging.getLogger(__name__)


class PlainJobs:
    """Runs plain jobs on the worker's engine, each prepared (validated, tokenized) in a thread off the event loop."""

    def __init__(self, engine: Any, config: WorkerConfig, input_tokenizer: Any, chat_template: ChatTemplateFacts,
                 eos_token_id: Optional[int], flush_policy: FlushPolicy, engine_info: EngineInfo,
                 startup: Optional[StartupReport] = None, adapters: Optional[Adapters] = None):
        self.engine = engine
        self.config = config
        self.input_tokenizer = input_tokenizer
        self.chat_template = chat_template  # end-of-turn token and system role (chat_template.py)
        self.eos_token_id = eos_token_id
        self.flush_policy = flush_policy  # the worker's one, shared with OpenAI jobs
        self.engine_info = engine_info  # reported with every job
        self.startup = startup  # reported once, with the first job served
        # The LoRA adapters a job may name (LORA_MODULES); none: only the model's own names.
        self.adapters = adapters or Adapters((), (config.model_label, config.model_name), lambda: None)
        # (job id, time.monotonic()) of the latest requests aborted unfinished, for the status endpoint.
        self.aborted: Deque[Tuple[str, float]] = deque(maxlen=100)
        self._prepare_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plain-job-input")

    async def run(self, job: Dict[str, Any]) -> AsyncIterator[Dict[str, Any]]:
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            # The longest prompts take a while to tokenize: in a thread, so that no other job's stream waits.
            job_input, prompt, params = await asyncio.get_running_loop().run_in_executor(
                self._prepare_thread, self._prepare, job.get("input"))
            adapter = self.adapters.choose(job_input.model)
            lora_request = await self.adapters.lora_request(adapter)
        except JobInputError as exc:
            yield exc.to_output()
            return
        except ValueError as exc:  # vLLM's own checks of sampling parameters
            yield error_output(INVALID_INPUT, str(exc), "sampling_params")
            return

        request_id = f"{job.get('id', 'job')}-{uuid.uuid4().hex[:8]}"
        generation = Generation(job_input.stream, self.flush_policy.stream())
        try:
            stream = self.engine.generate({"prompt_token_ids": prompt.token_ids}, params, request_id,
                                          lora_request=lora_request)
            async for output in stream:  # once per engine step: keep this loop lean
                for choice in output.outputs:
                    chunk = generation.add(choice)
                    if chunk:
                        yield chunk
                generation.finished = output.finished
        except EngineDeadError as exc:
            log.error("job %s failed: the vLLM engine is dead (%s)", job.get("id"), exc)
            yield error_output(ENGINE_DEAD, "the inference engine died; this worker is being replaced")
            return
        except Exception as exc:  # a request-level engine error fails this job only
            log.exception("job %s failed in the engine", job.get("id"))
            yield error_output(ENGINE_ERROR, f"{type(exc).__name__}: {exc}")
            return
        finally:
            await self._end_request(job.get("id"), request_id, generation)
        yield {**generation.last_output(len(prompt.token_ids)), "model": adapter or self.config.model_label,
               "engine": self.engine_info.to_output(), **self._startup_metadata_once()}

    def _prepare(self, raw: Any) -> Tuple[JobInput, PreparedPrompt, Any]:
        """The job's input validated, its prompt as token ids, and its vLLM SamplingParams."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        job_input = parse_job_input(raw, self.config.default_max_tokens, self.config.input_limits)
        prompt = prepare_prompt(job_input, self.input_tokenizer, self.config.max_model_len, self.chat_template)
        params = SamplingParams(**prompt.sampling, output_kind=RequestOutputKind.DELTA)
        if job_input.messages is not None:
            stop_at_end_of_turn(params, self.chat_template, self.eos_token_id)
        return job_input, prompt, params

    async def _end_request(self, job_id: Any, request_id: str, generation: "Generation") -> None:
        """Abort a request that did not finish (cancelled or failed), freeing its KV cache and batch slot now."""
        generation.batcher.close()
        if not generation.finished:
            await self.engine.abort(request_id)
            self.aborted.append((job_id, time.monotonic()))
            log.info("job %s ended before its request finished: engine request aborted after %d tokens",
                     job_id, generation.completion_tokens)

    def _startup_metadata_once(self) -> Dict[str, Any]:
        if self.startup is None:
            return {}
        startup, self.startup = self.startup, None
        startup.mark("first job served")
        return {"startup": startup.to_output()}


class Generation:
    """One plain job's generation as it goes: its text (streamed in chunks, or gathered), tokens, timing."""

    def __init__(self, stream: bool, batcher: StreamBatcher):
        self.stream = stream
        self.batcher = batcher
        self.texts: Dict[int, List[str]] = {}  # non-stream: each choice's text deltas
        self.finish: Dict[int, Optional[str]] = {}
        self.completion_tokens = 0
        self.started = time.monotonic()
        self.first_token_at: Optional[float] = None
        self.finished = False  # the engine finished the request

    def add(self, choice: Any) -> Optional[Dict[str, Any]]:
        """One choice's output of one engine step (vLLM's CompletionOutput, a delta); a chunk when one is due."""
        num_tokens = len(choice.token_ids)
        self.completion_tokens += num_tokens
        if self.first_token_at is None and num_tokens:
            self.first_token_at = time.monotonic()
        if choice.finish_reason is not None:
            self.finish[choice.index] = choice.finish_reason
        if not self.stream:
            self.texts.setdefault(choice.index, []).append(choice.text)
            return None
        ready = self.batcher.add((choice.index, choice.text), num_tokens, bool(choice.text))
        if not ready:
            return None
        return {"choices": [{"index": i, "text": t} for i, t in sorted(text_by_choice(ready).items())]}

    def last_output(self, prompt_tokens: int) -> Dict[str, Any]:
        """The job's last output: each choice with its finish reason (a finished request has one for each)."""
        pending = text_by_choice(self.batcher.drain())
        choices = [{"index": i, "text": pending.get(i, "") if self.stream else "".join(self.texts.get(i, [])),
                    "finish_reason": reason} for i, reason in sorted(self.finish.items())]
        ended = time.monotonic()
        return {
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "time_to_first_token_s": round((self.first_token_at or ended) - self.started, 4),
                "total_time_s": round(ended - self.started, 4),
                "tokens_per_second": round(self.completion_tokens / max(ended - self.started, 1e-9), 2),
            },
        }
