"""OpenAI-compatible jobs (RunPod's /openai/v1 passthrough: ``{"openai_route", "openai_input"}``), served
by vLLM's own serving classes on the worker's engine, with Gemma's chat rules, the end of turn, the input
contract and the stream batching added. Outputs match runpod-workers/worker-vllm: a dict, or SSE strings
(the last ending ``data: [DONE]``), or one error whose ``code`` is the HTTP status; a stream that fails
ends with its error after what it streamed (MAINTAINERS.md, "The OpenAI layer")."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from http import HTTPStatus
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from gams_worker.config import InputLimits, WorkerConfig
from gams_worker.errors import JobInputError, OpenAIRequestError, job_error_output
from gams_worker.jobs.chat_template import ChatTemplateFacts, stop_at_end_of_turn
from gams_worker.jobs.grammar import GrammarGate
from gams_worker.jobs.input import encoded_json, small_json
from gams_worker.jobs.messages import template_messages
from gams_worker.jobs.openai_input import (
    CHAT_ROUTE, COMPLETIONS_ROUTE, DETOKENIZE_ROUTE, MODELS_ROUTE, RESPONSES_ROUTE, TOKENIZE_ROUTE,
    check_openai_body, constraint_field,
)
from gams_worker.jobs.streaming import FlushPolicy, StreamBatcher

log = logging.getLogger(__name__)

JOB_FIELDS = ("openai_route", "openai_input")
# The most characters and items of a job's input (bytes of an HTTP body) parsed and checked on the event loop;
# a larger one in a thread (the hop to a thread costs more than a small input's checks).
CHECKED_INLINE_SIZE = 16384
STREAM_ERROR = 'data: {"error"'  # how vLLM's chat and completion streams report a failure: one event
Events = AsyncIterator[Tuple[str, bool]]  # a stream's SSE events, each with whether it carries text


@dataclasses.dataclass(frozen=True)
class VllmOpenAI:
    """vLLM's OpenAI protocol classes the worker uses (gams_worker/startup/vllm_release.py lists them)."""

    chat_request: Any
    completion_request: Any
    responses_request: Any  # vLLM's, tokenized as its chat route tokenizes (import_vllm_openai)
    tokenize_chat_request: Any
    tokenize_completion_request: Any
    detokenize_request: Any
    responses_response: Any
    whole_responses: Tuple[Any, ...]  # answered as one dict: chat, completion, tokenize and detokenize responses
    error_response: Any
    create_error_response: Callable[[Exception], Any]


@dataclasses.dataclass(frozen=True)
class Serving:
    """vLLM's serving objects on the worker's engine: built on the first OpenAI job, as they bind to its loop."""

    vllm: VllmOpenAI
    models: Any  # OpenAIServingModels
    chat: Any  # OpenAIServingChat
    completion: Any  # OpenAIServingCompletion
    responses: Any  # OpenAIServingResponses
    tokenization: Any  # ServingTokenization


@dataclasses.dataclass(frozen=True)
class Route:
    """How one route is served: vLLM's request model for a body, its serving call, and a stream's events."""

    request_class: Callable[[VllmOpenAI, Mapping[str, Any]], Any]
    serve: Callable[[Serving, Any], Awaitable[Any]]
    events: Callable[[Any, Any], Events] = lambda result, request: _marked_events(result, role_events=0)


# The routes with a request body (/v1/models has none), in the order the served ones are listed.
ROUTE_TABLE: Dict[str, Route] = {
    CHAT_ROUTE: Route(lambda vllm, body: vllm.chat_request,
                      lambda serving, request: serving.chat.create_chat_completion(request, None),
                      # A chat stream opens with one event per choice that carries only the role.
                      lambda result, request: _marked_events(result, role_events=request.n or 1)),
    COMPLETIONS_ROUTE: Route(lambda vllm, body: vllm.completion_request,
                             lambda serving, request: serving.completion.create_completion(request, None)),
    RESPONSES_ROUTE: Route(lambda vllm, body: vllm.responses_request,
                           lambda serving, request: serving.responses.create_responses(request, None),
                           lambda result, request: _responses_sse_events(result)),
    TOKENIZE_ROUTE: Route(lambda vllm, body: vllm.tokenize_chat_request if "messages" in body
                          else vllm.tokenize_completion_request,  # a prompt, or chat messages
                          lambda serving, request: serving.tokenization.create_tokenize(request, None)),
    DETOKENIZE_ROUTE: Route(lambda vllm, body: vllm.detokenize_request,
                            lambda serving, request: serving.tokenization.create_detokenize(request, None)),
}
ROUTES = (CHAT_ROUTE, COMPLETIONS_ROUTE, MODELS_ROUTE, RESPONSES_ROUTE, TOKENIZE_ROUTE, DETOKENIZE_ROUTE)


# vLLM's OpenAI layer takes seconds to import: the worker imports it while its engine starts.
SERVING_MODULES = ("vllm.entrypoints.openai.chat_completion.serving", "vllm.entrypoints.openai.completion.serving",
                   "vllm.entrypoints.openai.responses.serving", "vllm.entrypoints.serve.tokenize.serving")


def import_vllm_openai() -> VllmOpenAI:
    """vLLM's OpenAI protocol classes, imported on the first OpenAI job (they take seconds to import)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest, ResponsesResponse
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.entrypoints.serve.tokenize.protocol import (
        DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse,
    )

    class ChatTemplatedResponsesRequest(ResponsesRequest):
        """Tokenized without adding special tokens, as vLLM's chat route does (its own added a second <bos>)."""

        def build_tok_params(self, model_config: Any) -> Any:
            return dataclasses.replace(super().build_tok_params(model_config), add_special_tokens=False)

    return VllmOpenAI(
        chat_request=_stop_cap_of_the_worker(ChatCompletionRequest),
        completion_request=_stop_cap_of_the_worker(CompletionRequest),
        responses_request=_stop_cap_of_the_worker(ChatTemplatedResponsesRequest),
        tokenize_chat_request=TokenizeChatRequest, tokenize_completion_request=TokenizeCompletionRequest,
        detokenize_request=DetokenizeRequest,
        responses_response=ResponsesResponse,
        whole_responses=(ChatCompletionResponse, CompletionResponse, TokenizeResponse, DetokenizeResponse),
        error_response=ErrorResponse, create_error_response=create_error_response)


def _stop_cap_of_the_worker(request_class: Any) -> Any:
    """``request_class`` without vLLM's cap on ``stop`` lists (VLLM_MAX_STOP_STRINGS, 4, fixed when its
    protocol module is imported): MAX_STOP_STRINGS, checked first (openai_input.py), is the one cap."""
    import pydantic

    return pydantic.create_model(request_class.__name__, __base__=request_class,
                                 stop=(Optional[Union[str, List[str]]], []))


class OpenAIJobs:
    """Runs OpenAI passthrough jobs on the worker's engine through vLLM's serving layer."""

    def __init__(self, engine: Any, config: WorkerConfig, chat_template: ChatTemplateFacts,
                 flush_policy: FlushPolicy, input_tokenizer: Any, eos_token_id: Optional[int],
                 lora_modules: Sequence[Any] = ()):
        self.engine = engine
        self.config = config
        self.chat_template = chat_template  # end-of-turn token and system role (chat_template.py)
        self.flush_policy = flush_policy
        self.input_tokenizer = input_tokenizer  # the worker's own copy of the engine's, for grammar compiles
        self.eos_token_id = eos_token_id
        self.lora_modules = list(lora_modules)  # vLLM's LoRAModulePath of each adapter (startup/adapters.py)
        self._serving: Optional[Serving] = None
        self._init_lock = asyncio.Lock()
        self.grammar: Optional[GrammarGate] = None  # built with the serving objects, on first use

    async def serving(self) -> Serving:
        async with self._init_lock:
            if self._serving is None:
                self._serving = await self._build_serving(import_vllm_openai())
        return self._serving

    async def serving_models(self) -> Any:
        """vLLM's OpenAIServingModels: the model and the LoRA adapters, loaded into the engine."""
        return (await self.serving()).models

    async def _build_serving(self, vllm: VllmOpenAI) -> Serving:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
        from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
        from vllm.renderers.online_renderer import OnlineRenderer

        models = OpenAIServingModels(engine_client=self.engine, base_model_paths=[
            BaseModelPath(name=self.config.model_label, model_path=self.config.model_name)],
            lora_modules=self.lora_modules or None)
        await models.init_static_loras()  # each adapter loaded into the engine now; one that fails raises
        chat_template = self.chat_template

        class ChatRulesRenderer(OnlineRenderer):  # every chat-templated route renders through preprocess_chat
            async def preprocess_chat(self, request: Any, messages: List[Any], *args: Any, **kwargs: Any) -> Any:
                messages = template_messages(messages, chat_template)  # Gemma's chat rules
                return await super().preprocess_chat(request, messages, *args, **kwargs)

        template = dict(chat_template=None, chat_template_content_format="auto")  # the model's own template
        renderer = ChatRulesRenderer(model_config=self.engine.model_config, renderer=self.engine.renderer,
                                     request_logger=None, **template)
        engine = ServingEngine(self.engine, self.config.input_limits)
        chat_engine = ServingEngine(self.engine, self.config.input_limits, self.chat_template, self.eos_token_id)
        serving = Serving(
            vllm, models,
            chat=OpenAIServingChat(chat_engine, models, "assistant", online_renderer=renderer, request_logger=None,
                                   **template),
            completion=OpenAIServingCompletion(engine, models, online_renderer=renderer, request_logger=None),
            responses=OpenAIServingResponses(chat_engine, models, renderer, request_logger=None, **template),
            tokenization=ServingTokenization(models, renderer, **template))
        self.grammar = GrammarGate(self.engine, self.input_tokenizer,
                                   self.config.input_limits.grammar_compile_timeout_s)
        log.info("OpenAI routes ready for model %s: %s", self.config.model_label, ", ".join(ROUTES))
        return serving

    async def run(self, job_input: Mapping[str, Any]) -> AsyncIterator[Any]:
        try:
            serving = await self.serving()
            # The contract's checks walk and encode up to MAX_INPUT_BYTES: off the event loop unless small.
            if small_json(job_input, CHECKED_INLINE_SIZE):
                route, body, request = self._parse(job_input, serving.vllm)
            else:
                route, body, request = await asyncio.to_thread(self._parse, job_input, serving.vllm)
            if route == MODELS_ROUTE:
                yield (await serving.models.show_available_models()).model_dump()
                return
            field = constraint_field(body)
            if field is not None:
                await self.grammar.check(request.extract_structured_outputs(), field)
        except OpenAIRequestError as exc:
            yield exc.to_output()
            return
        except JobInputError as exc:
            yield OpenAIRequestError(exc.message, exc.field).to_output()
            return

        try:
            result = await ROUTE_TABLE[route].serve(serving, request)
        except JobInputError as exc:  # Gemma's chat rules, applied while vLLM renders the messages
            # On /v1/responses the messages are vLLM's, made of instructions + input.
            yield OpenAIRequestError(exc.message, "input" if route == RESPONSES_ROUTE else exc.field).to_output()
            return
        except Exception as exc:  # vLLM raises some request errors (e.g. bad sampling values)
            yield self._error_from_exception(exc, serving.vllm)
            return
        whole = _whole_answer(result, serving.vllm)
        if whole is not None:
            yield whole
            return
        async for output in self._stream(ROUTE_TABLE[route].events(result, request), result, serving.vllm):
            yield output

    async def _stream(self, events: Events, result: Any, vllm: VllmOpenAI) -> AsyncIterator[Any]:
        """A streamed answer, its events batched; a failed stream ends with its error."""
        batcher: StreamBatcher = self.flush_policy.stream()
        error: Optional[Dict[str, str]] = None
        try:
            async for event, has_text in events:
                if event.startswith(STREAM_ERROR):  # the request failed (e.g. the engine died) ...
                    error = job_error_output(json.loads(event[len("data: "):])["error"])
                    break  # ... and vLLM's [DONE] after it would make the job look completed
                batch = batcher.add(event, 1, has_text)
                if batch:
                    yield "".join(batch)
        except Exception as exc:  # the Responses stream raises instead of writing an error event
            error = self._error_from_exception(exc, vllm)
        finally:
            batcher.close()
            await events.aclose()
            await result.aclose()  # a job stopped mid-stream aborts its engine request now
        rest = batcher.drain()
        if rest:
            yield "".join(rest)
        if error is not None:
            yield error

    def _parse(self, job_input: Any, vllm: VllmOpenAI) -> Tuple[str, Dict[str, Any], Any]:
        """(route, body, vLLM's request) of a job; OpenAIRequestError or JobInputError naming the field at fault."""
        if not isinstance(job_input, Mapping):
            raise OpenAIRequestError("must be an object with openai_route and openai_input", "input")
        # Before anything of the input is echoed in an error (an unknown key, a value).
        encoded_json(job_input.get("openai_input"), "openai_input")
        encoded_json({key: value for key, value in job_input.items() if key != "openai_input"}, "input")
        for key in job_input:
            if key not in JOB_FIELDS:
                raise OpenAIRequestError(f"unknown field; allowed: {', '.join(JOB_FIELDS)}", key)
        route = job_input.get("openai_route")
        if route not in ROUTES:
            raise OpenAIRequestError(f"unknown route {route!r}; served: {', '.join(ROUTES)}",
                                     "openai_route", HTTPStatus.NOT_FOUND)
        if route == MODELS_ROUTE:
            return route, {}, None
        body = job_input.get("openai_input")
        if not isinstance(body, Mapping):
            raise OpenAIRequestError("must be the request body, a JSON object", "openai_input")
        body = dict(body)
        return route, body, self._parse_request(route, body, vllm)

    def _parse_request(self, route: str, body: Dict[str, Any], vllm: VllmOpenAI) -> Any:
        request_class = ROUTE_TABLE[route].request_class(vllm, body)
        fields = request_class.model_fields
        known = set(fields) | {field.alias for field in fields.values() if field.alias}
        check_openai_body(route, body, known, self.config.input_limits, self.chat_template)
        body.setdefault("model", self.config.model_label)
        try:
            # Strict, as plain jobs check types: "17" or 17.0 is not an integer, "true" not a boolean.
            return request_class.model_validate_json(json.dumps(body, ensure_ascii=False), strict=True)
        except Exception as exc:  # pydantic's ValidationError names the field at fault
            raise OpenAIRequestError(*_describe_validation_error(exc)) from None

    @staticmethod
    def _error_from_exception(exc: Exception, vllm: VllmOpenAI) -> Dict[str, str]:
        error = vllm.create_error_response(exc).model_dump()["error"]
        if error["code"] >= 500:
            log.exception("OpenAI request failed in the engine", exc_info=exc)
        return job_error_output(error)


def _whole_answer(result: Any, vllm: VllmOpenAI) -> Optional[Dict[str, Any]]:
    """The answer of a request vLLM answered whole (or refused), as the job's one output; None for a stream."""
    if isinstance(result, vllm.error_response):
        return job_error_output(result.model_dump()["error"])
    if isinstance(result, vllm.responses_response):
        return result.model_dump(mode="json", by_alias=True)  # as vLLM's /v1/responses writes it
    if isinstance(result, vllm.whole_responses):
        return result.model_dump()
    return None


class ServingEngine:
    """The engine as vLLM's serving layers see it: prompt logprobs over more than MAX_PROMPT_LOGPROBS_TOKENS
    refused where a prompt's tokens are first known; with ``chat_template``, stops at the end of turn."""

    def __init__(self, engine: Any, limits: InputLimits, chat_template: Optional[ChatTemplateFacts] = None,
                 eos_token_id: Optional[int] = None):
        self._engine = engine
        self._limit = limits.max_prompt_logprobs_tokens
        self._chat_template = chat_template
        self._eos_token_id = eos_token_id

    def generate(self, prompt: Any, sampling_params: Any, *args: Any, **kwargs: Any) -> Any:
        tokens = len(prompt.get("prompt_token_ids") or ()) if isinstance(prompt, Mapping) else 0
        if sampling_params.prompt_logprobs is not None and tokens > self._limit:
            from vllm.exceptions import VLLMValidationError  # vLLM's serving layer answers it as a 400

            raise VLLMValidationError(
                f"asks for prompt logprobs (prompt_logprobs, or echo) over a prompt of {tokens} "
                f"tokens; MAX_PROMPT_LOGPROBS_TOKENS allows at most {self._limit}", parameter="prompt_logprobs")
        if self._chat_template is not None:
            stop_at_end_of_turn(sampling_params, self._chat_template, self._eos_token_id)
        return self._engine.generate(prompt, sampling_params, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _describe_validation_error(exc: Exception) -> tuple:
    """(message, param) for a pydantic ValidationError: the first problem and its field path."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc), None
    first = errors()[0]
    path = ""
    for part in first.get("loc", ()):
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return first.get("msg", str(exc)), path or None


async def _marked_events(events: AsyncIterator[str], role_events: int) -> AsyncIterator[Tuple[str, bool]]:
    """Chat and completion SSE events, each with whether it carries text (all but the first ``role_events``)."""
    async for event in events:
        yield event, role_events <= 0
        role_events -= 1


async def _responses_sse_events(events: AsyncIterator[Any]) -> AsyncIterator[Tuple[str, bool]]:
    """Responses stream events as vLLM's /v1/responses route writes them, each with whether it is a text delta."""
    async for event in events:
        sse = f"event: {event.type}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"
        yield sse, event.type.endswith(".delta")
