"""OpenAI-compatible jobs: RunPod's /openai/v1 passthrough, served by vLLM's own OpenAI layer.

RunPod turns a call to ``https://api.runpod.ai/v2/<endpoint>/openai/v1/...`` into a job
``{"openai_route": "/v1/chat/completions", "openai_input": {...}}`` and relays what the
job yields. The outputs match runpod-workers/worker-vllm:

    non-stream:  one dict, the ChatCompletion / Completion / model list JSON
    stream:      strings, each a concatenation of whole SSE events ``data: {json}\\n\\n``;
                 the last one ends with ``data: [DONE]\\n\\n``
    error:       one dict {"error": {"message", "type", "param", "code"}}, where ``code``
                 is the HTTP status (400, 404, 500...) the platform should answer with

Requests are run by vLLM's OpenAIServingChat / OpenAIServingCompletion / OpenAIServingModels /
OpenAIServingResponses / ServingTokenization on the worker's one engine, so templating,
sampling, logprobs, n, structured output and usage are vLLM's, exactly as ``vllm serve`` does
them. The worker adds four things: a leading system message folded into the first user turn
where the chat template refuses a system role (Gemma 2; Responses ``instructions`` too), chat
and Responses requests stopped at the template's end of turn (gams_worker.jobs.chat_template),
rejection of fields vLLM would silently ignore, and batching of stream events.

/v1/responses streams SSE events as ``vllm serve`` writes them (``event: <type>\ndata: {json}``,
no ``[DONE]``); /v1/tokenize takes ``prompt`` or ``messages`` and /v1/detokenize ``tokens``,
answering one dict each, as vLLM's /tokenize and /detokenize do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from http import HTTPStatus
from typing import Any, AsyncIterator, Callable, Dict, List, Mapping, Optional

from gams_worker.config import WorkerConfig
from gams_worker.jobs.chat_template import ChatTemplateFacts, EndOfTurnEngine

log = logging.getLogger(__name__)

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
MODELS_ROUTE = "/v1/models"
RESPONSES_ROUTE = "/v1/responses"
TOKENIZE_ROUTE = "/v1/tokenize"
DETOKENIZE_ROUTE = "/v1/detokenize"
ROUTES = (CHAT_ROUTE, COMPLETIONS_ROUTE, MODELS_ROUTE, RESPONSES_ROUTE, TOKENIZE_ROUTE, DETOKENIZE_ROUTE)
JOB_FIELDS = ("openai_route", "openai_input")
SSE_DONE = "data: [DONE]\n\n"


class OpenAIRequestError(Exception):
    """A request the worker refuses before vLLM sees it; becomes an OpenAI error JSON."""

    def __init__(self, message: str, param: Optional[str] = None,
                 status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        self.message = message
        self.param = param
        self.status = status
        super().__init__(message)

    def to_output(self) -> Dict[str, Any]:
        return openai_error(self.message, self.status, self.param)


def openai_error(message: str, status: HTTPStatus, param: Optional[str] = None) -> Dict[str, Any]:
    """OpenAI's error shape as vLLM writes it: ``type`` names the error, ``code`` is the HTTP status."""
    error_type = {
        HTTPStatus.BAD_REQUEST: "BadRequestError",
        HTTPStatus.NOT_FOUND: "NotFoundError",
    }.get(status, "InternalServerError")
    return {"error": {"message": message, "type": error_type, "param": param, "code": int(status)}}


def fold_system_message(messages: List[Any]) -> List[Any]:
    """Gemma 2 has no system role: prepend a leading system message to the first user turn.

    Same rule as plain jobs (gams_worker.jobs.chat): joined by a blank line; a system message
    anywhere but first is an error. Messages stay OpenAI dicts (content a string or parts).
    """
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise OpenAIRequestError("must be an object with 'role' and 'content'", f"messages[{i}]")
        if i > 0 and message.get("role") == "system":
            raise OpenAIRequestError("a system message may only come first (Gemma 2 has no system role)",
                                     f"messages[{i}].role")
    if not messages or messages[0].get("role") != "system":
        return messages
    system_text = _text_of(messages[0].get("content"), "messages[0].content")
    rest = list(messages[1:])
    if rest and rest[0].get("role") == "user":
        content = rest[0].get("content")
        if isinstance(content, str):
            folded = f"{system_text}\n\n{content}"
        elif isinstance(content, list):
            folded = [{"type": "text", "text": f"{system_text}\n\n"}] + content
        else:
            raise OpenAIRequestError("must be a string or a list of content parts", "messages[1].content")
        return [{**rest[0], "content": folded}] + rest[1:]
    return [{"role": "user", "content": system_text}] + rest


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "".join(part["text"] for part in content)
    raise OpenAIRequestError("a system message must be a string or a list of text parts", param)


class SseBatcher:
    """Gathers SSE events into strings of whole events, flushed by count or by time.

    vLLM writes one event per generated token and choice, so ``batch_events`` plays the
    role of STREAM_BATCH_TOKENS. The first token is flushed at once (the first flush
    waits only for one event after the role event), as for plain jobs.
    """

    def __init__(self, batch_events: int, batch_ms: int, clock: Callable[[], float] = time.monotonic):
        self._batch_events = batch_events
        self._batch_s = batch_ms / 1000.0
        self._clock = clock
        self._events: List[str] = []
        self._last_flush: Optional[float] = None  # None: nothing flushed yet

    def add(self, event: str) -> Optional[str]:
        """Gather one event; return the batch to send when a flush is due, else None."""
        self._events.append(event)
        now = self._clock()
        if self._last_flush is None:
            due = len(self._events) >= 2
        else:
            due = len(self._events) >= self._batch_events or now - self._last_flush >= self._batch_s
        if not due:
            return None
        self._last_flush = now
        return self.drain()

    def drain(self) -> str:
        batch, self._events = "".join(self._events), []
        return batch


def _import_vllm_openai() -> Dict[str, Any]:
    """vLLM's OpenAI serving classes. Module paths are those of vLLM 0.25 to 0.33;
    ErrorResponse and create_error_response moved between 0.25 and 0.32."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.renderers.online_renderer import OnlineRenderer

    try:  # vLLM >= 0.26
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    except ImportError:  # vLLM 0.25
        from vllm.entrypoints.openai.engine.protocol import ErrorResponse
    try:  # vLLM >= 0.26
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    except ImportError:  # vLLM 0.25
        from vllm.entrypoints.serve.utils.error_response import create_error_response
    return dict(
        ChatCompletionRequest=ChatCompletionRequest, ChatCompletionResponse=ChatCompletionResponse,
        OpenAIServingChat=OpenAIServingChat, CompletionRequest=CompletionRequest,
        CompletionResponse=CompletionResponse, OpenAIServingCompletion=OpenAIServingCompletion,
        BaseModelPath=BaseModelPath, OpenAIServingModels=OpenAIServingModels, OnlineRenderer=OnlineRenderer,
        ErrorResponse=ErrorResponse, create_error_response=create_error_response,
    )


class OpenAIRoutes:
    """Runs OpenAI passthrough jobs on the worker's engine through vLLM's serving layer."""

    def __init__(self, engine: Any, config: WorkerConfig, chat_template: Optional[ChatTemplateFacts] = None):
        self.engine = engine
        self.config = config
        self.chat_template = chat_template  # None: fold system messages, no end-of-turn stop
        self._fold_system = chat_template is None or not chat_template.accepts_system
        self._vllm: Optional[Dict[str, Any]] = None
        self._init_lock = asyncio.Lock()

    async def _serving(self) -> Dict[str, Any]:
        """Build the serving objects on first use, inside the job loop (they bind to it)."""
        async with self._init_lock:
            if self._vllm is None:
                self._vllm = await self._build_serving()
        return self._vllm

    async def _build_serving(self) -> Dict[str, Any]:
        vllm = _import_vllm_openai()
        # Only arguments that vLLM 0.25 to 0.33 all accept; the rest keep vLLM's defaults.
        models = vllm["OpenAIServingModels"](
            engine_client=self.engine,
            base_model_paths=[vllm["BaseModelPath"](name=self.config.model_label,
                                                    model_path=self.config.model_name)],
        )
        await models.init_static_loras()
        renderer_class = vllm["OnlineRenderer"]
        if self._fold_system:
            renderer_class = _system_folding_renderer(renderer_class)
        renderer = renderer_class(
            model_config=self.engine.model_config,
            renderer=self.engine.renderer,
            request_logger=None,
            chat_template=None,  # the model's own template
            chat_template_content_format="auto",
        )
        chat_engine = self.engine  # chat and Responses requests stop at the template's end of turn
        if self.chat_template is not None:
            chat_engine = EndOfTurnEngine(self.engine, self.chat_template, self.engine.get_tokenizer().eos_token_id)
        chat = vllm["OpenAIServingChat"](
            chat_engine, models, "assistant",
            online_renderer=renderer, request_logger=None,
            chat_template=None, chat_template_content_format="auto",
        )
        completion = vllm["OpenAIServingCompletion"](
            self.engine, models, online_renderer=renderer, request_logger=None,
        )
        extra = _import_vllm_responses_and_tokenize()
        responses = extra["OpenAIServingResponses"](
            chat_engine, models, renderer,
            request_logger=None, chat_template=None, chat_template_content_format="auto",
        )
        tokenization = extra["ServingTokenization"](
            models, renderer, chat_template=None, chat_template_content_format="auto",
        )
        log.info("OpenAI routes ready for model %s: %s", self.config.model_label, ", ".join(ROUTES))
        return {**vllm, **extra, "models": models, "chat": chat, "completion": completion,
                "responses": responses, "tokenization": tokenization}

    async def run(self, job_input: Mapping[str, Any]) -> AsyncIterator[Any]:
        """Yield the outputs of one passthrough job (see the module docstring)."""
        try:
            route, body = self._parse_job(job_input)
            vllm = await self._serving()
            if route == MODELS_ROUTE:
                yield (await vllm["models"].show_available_models()).model_dump()
                return
            request = self._parse_request(route, body, vllm)
        except OpenAIRequestError as exc:
            yield exc.to_output()
            return

        try:
            if route == CHAT_ROUTE:
                result = await vllm["chat"].create_chat_completion(request, None)
            elif route == RESPONSES_ROUTE:
                result = await vllm["responses"].create_responses(request, None)
            elif route == TOKENIZE_ROUTE:
                result = await vllm["tokenization"].create_tokenize(request, None)
            elif route == DETOKENIZE_ROUTE:
                result = await vllm["tokenization"].create_detokenize(request, None)
            else:
                result = await vllm["completion"].create_completion(request, None)
        except OpenAIRequestError as exc:  # raised while vLLM renders the messages
            if route == RESPONSES_ROUTE:
                exc.param = "input"  # the messages it names are vLLM's, made of instructions + input
            yield exc.to_output()
            return
        except Exception as exc:  # vLLM raises some request errors (e.g. bad sampling values)
            yield self._error_from_exception(exc, vllm)
            return

        if isinstance(result, vllm["ResponsesResponse"]):
            yield result.model_dump(mode="json", by_alias=True)  # as vLLM's /v1/responses writes it
            return
        if isinstance(result, (vllm["ErrorResponse"], vllm["ChatCompletionResponse"], vllm["CompletionResponse"],
                               vllm["TokenizeResponse"], vllm["DetokenizeResponse"])):
            yield result.model_dump()
            return
        if route == RESPONSES_ROUTE:
            result = _responses_sse_events(result)
        batcher = SseBatcher(self.config.stream_batch_tokens, self.config.stream_batch_ms)
        async for event in result:
            batch = batcher.add(event)
            if batch:
                yield batch
        rest = batcher.drain()
        if rest:
            yield rest

    def _parse_job(self, job_input: Mapping[str, Any]) -> tuple:
        for key in job_input:
            if key not in JOB_FIELDS:
                raise OpenAIRequestError(f"unknown field; allowed: {', '.join(JOB_FIELDS)}", key)
        route = job_input.get("openai_route")
        if route not in ROUTES:
            raise OpenAIRequestError(f"unknown route {route!r}; served: {', '.join(ROUTES)}",
                                     "openai_route", HTTPStatus.NOT_FOUND)
        body = job_input.get("openai_input")
        if route == MODELS_ROUTE:
            return route, body
        if not isinstance(body, Mapping):
            raise OpenAIRequestError("must be the request body, a JSON object", "openai_input")
        return route, dict(body)

    def _parse_request(self, route: str, body: Dict[str, Any], vllm: Dict[str, Any]) -> Any:
        request_class = _request_class(route, body, vllm)
        # vLLM logs and ignores unknown fields; a misspelt parameter must not pass silently.
        known = set(request_class.model_fields) | {
            field.alias for field in request_class.model_fields.values() if field.alias
        }
        for key in body:
            if key not in known:
                raise OpenAIRequestError(f"unknown parameter {key!r}", key)
        if route == CHAT_ROUTE and self._fold_system and isinstance(body.get("messages"), list):
            body["messages"] = fold_system_message(body["messages"])
        body.setdefault("model", self.config.model_label)
        try:
            return request_class(**body)
        except Exception as exc:  # pydantic's ValidationError names the field at fault
            raise OpenAIRequestError(*_describe_validation_error(exc)) from None

    @staticmethod
    def _error_from_exception(exc: Exception, vllm: Dict[str, Any]) -> Dict[str, Any]:
        error = vllm["create_error_response"](exc).model_dump()
        if error["error"]["code"] >= 500:
            log.exception("OpenAI request failed in the engine", exc_info=exc)
        return error


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


def _request_class(route: str, body: Mapping[str, Any], vllm: Dict[str, Any]) -> Any:
    """vLLM's request model for a route; /v1/tokenize takes a prompt or chat messages."""
    if route == TOKENIZE_ROUTE:
        return vllm["TokenizeChatRequest"] if "messages" in body else vllm["TokenizeCompletionRequest"]
    return {
        CHAT_ROUTE: vllm["ChatCompletionRequest"],
        COMPLETIONS_ROUTE: vllm["CompletionRequest"],
        RESPONSES_ROUTE: vllm["ResponsesRequest"],
        DETOKENIZE_ROUTE: vllm["DetokenizeRequest"],
    }[route]


def _import_vllm_responses_and_tokenize() -> Dict[str, Any]:
    """vLLM's Responses and tokenization serving classes (same module paths in vLLM 0.25 to 0.33)."""
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest, ResponsesResponse
    from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
    from vllm.entrypoints.serve.tokenize.protocol import (
        DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse,
    )
    from vllm.entrypoints.serve.tokenize.serving import ServingTokenization

    class ChatTemplatedResponsesRequest(ResponsesRequest):
        """Tokenizes the rendered chat template without adding special tokens, as vLLM's chat
        route does; its Responses route adds them, so Gemma's prompt got a second <bos>."""

        def build_tok_params(self, model_config: Any) -> Any:
            return dataclasses.replace(super().build_tok_params(model_config), add_special_tokens=False)

    return dict(
        ResponsesRequest=ChatTemplatedResponsesRequest, ResponsesResponse=ResponsesResponse,
        OpenAIServingResponses=OpenAIServingResponses, ServingTokenization=ServingTokenization,
        TokenizeChatRequest=TokenizeChatRequest, TokenizeCompletionRequest=TokenizeCompletionRequest,
        TokenizeResponse=TokenizeResponse, DetokenizeRequest=DetokenizeRequest,
        DetokenizeResponse=DetokenizeResponse,
    )


async def _responses_sse_events(events: AsyncIterator[Any]) -> AsyncIterator[str]:
    """Responses stream events as SSE text, as vLLM's /v1/responses route writes them."""
    async for event in events:
        yield f"event: {event.type}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"


def _system_folding_renderer(online_renderer_class: Any) -> Any:
    """vLLM's OnlineRenderer, folding a leading system message before the chat template sees it.

    Every chat-templated route (chat, Responses with ``instructions``, tokenize) renders
    through ``preprocess_chat``, so this is the one place that serves templates refusing a
    system role.
    """

    class SystemFoldingRenderer(online_renderer_class):
        async def preprocess_chat(self, request: Any, messages: List[Any], *args: Any, **kwargs: Any) -> Any:
            return await super().preprocess_chat(request, fold_system_message(list(messages)), *args, **kwargs)

    return SystemFoldingRenderer
