"""The request contract of OpenAI jobs, checked before vLLM sees a body: what each route accepts
(every other field refused by name, with the reason where there is one), and every parameter that
costs the engine measured under the limits of plain jobs (MAINTAINERS.md, "The OpenAI layer")."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Tuple

from gams_worker.config import InputLimits
from gams_worker.errors import JobInputError
from gams_worker.jobs.chat_template import ChatTemplateFacts
from gams_worker.jobs.input import (
    SAMPLING_FIELDS, check_count, check_input_size, check_prompt_chars, check_sequences, check_stop_strings,
    nests_deeper_than,
)
from gams_worker.jobs.messages import check_message, refuse_control_tokens, strings_in, template_messages

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
MODELS_ROUTE = "/v1/models"
RESPONSES_ROUTE = "/v1/responses"
TOKENIZE_ROUTE = "/v1/tokenize"
DETOKENIZE_ROUTE = "/v1/detokenize"

# Sampling parameters of every generating route (all are fields of vLLM's three request models).
_SAMPLING = ("model", "stream", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos",
             "logit_bias", "skip_special_tokens", "include_stop_str_in_output", "structured_outputs",
             "cache_salt", "user")
ROUTE_FIELDS: Dict[str, Tuple[str, ...]] = {
    CHAT_ROUTE: _SAMPLING + (
        "messages", "max_tokens", "max_completion_tokens", "n", "min_tokens", "logprobs", "top_logprobs",
        "prompt_logprobs", "response_format", "stream_options", "bad_words", "spaces_between_special_tokens",
        "echo", "add_generation_prompt", "continue_final_message", "tool_choice", "return_token_ids"),
    COMPLETIONS_ROUTE: _SAMPLING + (
        "prompt", "max_tokens", "n", "min_tokens", "logprobs", "prompt_logprobs", "echo", "response_format",
        "stream_options", "bad_words", "spaces_between_special_tokens", "add_special_tokens", "return_token_ids"),
    RESPONSES_ROUTE: _SAMPLING + (
        "input", "instructions", "max_output_tokens", "top_logprobs", "text", "tool_choice", "tools",
        "parallel_tool_calls", "include", "metadata", "store", "truncation", "service_tier"),
    TOKENIZE_ROUTE: ("model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                     "continue_final_message", "return_token_strs"),
    DETOKENIZE_ROUTE: ("model", "tokens"),
}
# Why some of vLLM's parameters are not served (every other one: "not served by this worker").
REFUSED_BECAUSE = {
    **dict.fromkeys(("tools", "functions", "function_call", "parallel_tool_calls"),
                    "tool calling is not served: GaMS's chat template has no tools"),
    **dict.fromkeys(("use_beam_search", "length_penalty"),
                    "beam search is not served: it runs a batch of sequences per job outside the limits"),
    "chat_template": "the chat template is the model's own: a request cannot replace it",
    "chat_template_kwargs": "the chat template is the model's own: a request cannot configure it",
    "request_id": "request ids are the worker's own",
    "priority": "every job has the same priority",
    "allowed_token_ids": "not served (a full-vocabulary mask per request)",
    "logprob_token_ids": "not served; use logprobs / top_logprobs",
    "prompt_embeds": "prompt embeddings are not served",
    "previous_response_id": "responses are not stored: send the conversation as input",
    "background": "responses are not stored, so they cannot run in the background",
    **dict.fromkeys(("reasoning", "reasoning_effort"), "GaMS does not reason in a separate channel"),
    "truncate_prompt_tokens": "prompts are never cut: a prompt that does not fit is an error",
}
CONSTRAINT_FIELDS = ("response_format", "structured_outputs", "text")  # what gets a grammar


def check_openai_body(route: str, body: Mapping[str, Any], known: Any, limits: InputLimits,
                      template: Optional[ChatTemplateFacts]) -> None:
    """Refuse, naming the field, what the route does not accept or what breaks a limit (``known``: the
    fields of vLLM's request model for the route, to tell its parameters not served from unknown ones)."""
    check_input_size(body, limits, "openai_input")
    accepted = _accepted_fields(route, body, known)
    given = {key: value for key, value in body.items() if value is not None}
    prompts = _check_text(route, given, limits, template)
    _check_sampling(given, prompts, limits)
    _check_token_lists(given, limits)
    # logprobs is a count on /v1/completions and true/false on chat (top_logprobs is the count there).
    counts = ("top_logprobs", "prompt_logprobs") + (("logprobs",) if route == COMPLETIONS_ROUTE else ())
    for key in counts:
        if key in given:
            _logprob_count(key, given[key], limits)
    for key in CONSTRAINT_FIELDS:
        if key in given and key in accepted:
            _check_constraint(key, given[key], limits)
    tool_choices = ("none", "auto") if route == RESPONSES_ROUTE else ("none",)  # "auto" is Responses' default
    if "tool_choice" in given and given["tool_choice"] not in tool_choices:
        raise JobInputError(REFUSED_BECAUSE["tools"], "tool_choice")
    if route == RESPONSES_ROUTE and given.get("tools"):
        raise JobInputError(REFUSED_BECAUSE["tools"], "tools")
    if route == DETOKENIZE_ROUTE and "tokens" in given:
        _token_ids("tokens", given["tokens"])


def _check_sampling(given: Mapping[str, Any], prompts: int, limits: InputLimits) -> None:
    """Types and limits of the sampling parameters plain jobs have too."""
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if key in given:
            SAMPLING_FIELDS["max_tokens"](key, given[key])
    if "min_tokens" in given:
        SAMPLING_FIELDS["min_tokens"]("min_tokens", given["min_tokens"])
    n = SAMPLING_FIELDS["n"]("n", given["n"]) if "n" in given else 1
    check_sequences(n, prompts, limits, "n", "prompt")
    if "stop" in given:
        check_stop_strings(SAMPLING_FIELDS["stop"]("stop", given["stop"]), limits, "stop")


def _check_token_lists(given: Mapping[str, Any], limits: InputLimits) -> None:
    """stop_token_ids, bad_words and logit_bias: each checked at every step of the request."""
    if "stop_token_ids" in given:
        ids = _token_ids("stop_token_ids", given["stop_token_ids"])
        check_count(len(ids), limits.max_stop_token_ids, "MAX_STOP_TOKEN_IDS", "stop token ids", "stop_token_ids")
    if "bad_words" in given:
        if not isinstance(given["bad_words"], list):
            raise JobInputError("must be a list of strings", "bad_words")
        words = SAMPLING_FIELDS["stop"]("bad_words", given["bad_words"])  # each a non-empty string
        check_count(len(words), limits.max_bad_words, "MAX_BAD_WORDS", "bad words", "bad_words")
        for i, word in enumerate(words):
            check_count(len(word), limits.max_stop_length, "MAX_STOP_LENGTH", "characters", f"bad_words[{i}]")
    if "logit_bias" in given:
        bias = given["logit_bias"]
        if not isinstance(bias, Mapping):
            raise JobInputError("must be an object of token id -> bias", "logit_bias")
        check_count(len(bias), limits.max_logit_bias, "MAX_LOGIT_BIAS", "entries", "logit_bias")


def _accepted_fields(route: str, body: Mapping[str, Any], known: Any) -> Tuple[str, ...]:
    """The route's fields vLLM's request model has; JobInputError naming any other field of ``body``."""
    accepted = tuple(key for key in ROUTE_FIELDS[route] if key in known)  # /v1/tokenize: prompt or messages
    for key in body:
        if key in accepted or (key in known and body[key] is None):  # null: vLLM's default
            continue
        if key in known:
            why = REFUSED_BECAUSE.get(key, "not served by this worker")
            raise JobInputError(f"{key!r}: {why}; {route} accepts: {', '.join(accepted)}", key)
        raise JobInputError(f"unknown parameter {key!r}; {route} accepts: {', '.join(accepted)}", key)
    return accepted


def constraint_field(body: Mapping[str, Any]) -> Optional[str]:
    """The body field that asks for structured output (a grammar), if any."""
    return next((key for key in CONSTRAINT_FIELDS if body.get(key) is not None), None)


def _check_text(route: str, body: Mapping[str, Any], limits: InputLimits,
                template: Optional[ChatTemplateFacts]) -> int:
    """Measure the prompt text of a route; return how many prompts the request makes."""
    if "messages" in body:  # chat, tokenize
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise JobInputError("must be a non-empty list of {role, content} messages", "messages")
        check_count(len(messages), limits.max_messages, "MAX_MESSAGES", "messages", "messages")
        for i, message in enumerate(messages):
            check_message(message, f"messages[{i}]", plain=False)
        _check_chat_text(messages, "messages", limits, template)
        template_messages(messages, template)  # a system or developer message only first, where Gemma 2 folds it
        return 1
    if route == RESPONSES_ROUTE:
        return _check_responses_input(body, limits, template)
    if "prompt" in body:  # completions, tokenize: raw prompts, the caller's own (special tokens too)
        return _check_prompts(body["prompt"], limits)
    return 1


def _check_chat_text(value: Any, field: str, limits: InputLimits, template: Optional[ChatTemplateFacts],
                     extra_chars: int = 0) -> None:
    chars = extra_chars + sum(len(text) for _, text in strings_in(value, field))
    check_prompt_chars(chars, field, limits)
    refuse_control_tokens(value, field, template)


def _check_responses_input(body: Mapping[str, Any], limits: InputLimits,
                           template: Optional[ChatTemplateFacts]) -> int:
    """/v1/responses: ``instructions`` and ``input`` (a string or message items), counted together as ``input``."""
    instructions = body.get("instructions", "")
    if not isinstance(instructions, str):
        raise JobInputError("must be a string", "instructions")
    refuse_control_tokens(instructions, "instructions", template)
    items = body.get("input")
    if isinstance(items, list):
        check_count(len(items), limits.max_messages, "MAX_MESSAGES", "input items", "input")
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or item.get("type", "message") != "message":
                raise JobInputError("only message items {role, content} are served (GaMS has no tools or "
                                    "reasoning items)", f"input[{i}]")
            check_message(item, f"input[{i}]", plain=False)
    elif not isinstance(items, str):
        raise JobInputError("must be a string or a list of message items", "input")
    _check_chat_text(items, "input", limits, template, extra_chars=len(instructions))
    if isinstance(items, list):  # vLLM's messages: instructions as a system message, then the items
        try:
            template_messages(([{"role": "system", "content": instructions}] if instructions else []) + items,
                              template)
        except JobInputError as exc:
            raise JobInputError(exc.message, "input") from None
    return 1


def _check_prompts(prompt: Any, limits: InputLimits) -> int:
    """/v1/completions ``prompt``: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompts, texts = 1, [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts, texts = len(prompt), prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts, texts = 1, []
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        for i, ids in enumerate(prompt):
            _token_ids(f"prompt[{i}]", ids)
        prompts, texts = len(prompt), []
    else:
        raise JobInputError("must be a string, a non-empty list of strings, a list of token ids, "
                            "or a list of lists of token ids", "prompt")
    check_prompt_chars(sum(len(text) for text in texts), "prompt", limits)
    return prompts


def _token_ids(field: str, value: Any) -> List[int]:
    if not isinstance(value, list):
        raise JobInputError("must be a list of token ids", field)
    for i, token_id in enumerate(value):
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise JobInputError("must be a token id (an integer >= 0)", f"{field}[{i}]")
    return value


def _logprob_count(field: str, value: Any, limits: InputLimits) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobInputError("must be an integer", field)
    if value < 0:  # vLLM reads -1 as the whole vocabulary
        raise JobInputError(f"must be an integer from 0 to {limits.max_logprobs} (MAX_LOGPROBS); "
                            "-1, the whole vocabulary, is not served", field)
    check_count(value, limits.max_logprobs, "MAX_LOGPROBS", "logprobs per token", field)


def _check_constraint(field: str, value: Any, limits: InputLimits) -> None:
    """A structured-output constraint's size as JSON and depth (a schema sent as JSON text counts as that JSON)."""
    if not isinstance(value, Mapping):
        raise JobInputError("must be an object", field)
    size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    if size > limits.max_grammar_bytes:
        raise JobInputError(f"is {size} bytes as JSON; MAX_GRAMMAR_BYTES allows at most {limits.max_grammar_bytes}",
                            field)
    nested = [value]
    for key in ("json", "structural_tag"):  # structured_outputs may carry these as JSON text
        if isinstance(value.get(key), str):
            try:
                nested.append(json.loads(value[key]))
            except RecursionError:
                _too_deep(field, limits)
            except ValueError:
                pass  # not JSON: vLLM's own validation names it
    if any(nests_deeper_than(item, limits.max_schema_depth) for item in nested):
        _too_deep(field, limits)


def _too_deep(field: str, limits: InputLimits) -> None:
    raise JobInputError(f"nests objects and arrays more than {limits.max_schema_depth} levels deep; "
                        "MAX_SCHEMA_DEPTH allows at most that", field)
