"""Validation of a job's input: a plain job into a typed ``JobInput``, and the input limits of
both dialects (an OpenAI job's request body meets the same limits).

A plain job's accepted shape (every other field is rejected by name)::

    {"prompt": "..."}  or  {"messages": [{"role": "user", "content": "..."}, ...]}
    "sampling_params": {...}   optional, see SAMPLING_FIELDS
    "stream": false            optional; true streams chunks as they are generated

Errors raise ``JobInputError`` with the dotted path of the field at fault.

Size limits are checked before any tokenization or engine work; a job over one gets an error
naming the field, and no limit ever truncates. The defaults (each overridable by the
environment variable in brackets):

- ``max_input_bytes`` [MAX_INPUT_BYTES] 1 MiB: the whole ``input`` (an OpenAI job's request
  body) as UTF-8 JSON. RunPod itself accepts up to 10 MB (/run) and 20 MB (/runsync); nothing
  that fits GaMS's context comes near 1 MiB, and it bounds the worker's memory and parsing time.
- ``max_prompt_chars`` [MAX_PROMPT_CHARS] 200,000: the prompt, or all message contents
  together (/v1/responses: ``input`` with ``instructions``). GaMS's 8192-token context holds roughly 40,000 characters of Slovene; the rest is
  headroom for unusual tokenizations. It bounds tokenizer time, which runs on the event loop.
- ``max_messages`` [MAX_MESSAGES] 256 chat messages (/v1/responses: ``input`` items).
- ``max_stop_strings`` [MAX_STOP_STRINGS] 16 and ``max_stop_length`` [MAX_STOP_LENGTH] 256
  characters each: vLLM checks every stop string against new text at every step.
- ``max_n`` [MAX_N] 16 choices per job: each choice is a sequence in the batch.

``max_tokens`` is bounded by MAX_MODEL_LEN minus the prompt's tokens (gams_worker/jobs/chat.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from gams_worker.errors import JobInputError
from gams_worker.jobs.chat import join_text_parts

ROLES = ("system", "user", "assistant")
MAX_TOP_K = 2**31 - 1  # vLLM keeps top_k in int32; any value >= the vocabulary means "all"


@dataclasses.dataclass(frozen=True)
class InputLimits:
    max_input_bytes: int = 1_048_576
    max_prompt_chars: int = 200_000
    max_messages: int = 256
    max_stop_strings: int = 16
    max_stop_length: int = 256
    max_n: int = 16


def check_input_size(raw: Any, limits: InputLimits, field: str) -> None:
    """The whole input, serialized as the platform sent it, must fit ``max_input_bytes``."""
    try:
        encoded = json.dumps(raw, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        raise JobInputError("contains a lone surrogate (text that is not valid Unicode)", field) from None
    except (TypeError, ValueError, RecursionError):
        raise JobInputError("must be plain JSON (objects, lists, strings, finite numbers)", field) from None
    if len(encoded) > limits.max_input_bytes:
        raise JobInputError(
            f"is {len(encoded)} bytes as JSON; MAX_INPUT_BYTES allows at most {limits.max_input_bytes}", field
        )


def check_prompt_chars(chars: int, field: str, limits: InputLimits) -> None:
    if chars > limits.max_prompt_chars:
        raise JobInputError(
            f"is {chars} characters; MAX_PROMPT_CHARS allows at most {limits.max_prompt_chars}", field
        )


def check_count(count: int, maximum: int, variable: str, what: str, field: str) -> None:
    if count > maximum:
        raise JobInputError(f"has {count} {what}; {variable} allows at most {maximum}", field)


@dataclasses.dataclass(frozen=True)
class JobInput:
    prompt: Optional[str]
    messages: Optional[Tuple[Dict[str, str], ...]]  # {"role", "content"}, text parts joined
    sampling: Dict[str, Any]  # validated SamplingParams keyword arguments
    stream: bool
    max_tokens_given: bool  # False: max_tokens is the default and may be lowered to fit the model


def _number(low: float, high: float, low_open: bool = False) -> Callable[[str, Any], float]:
    def check(field: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise JobInputError("must be a number", field)
        if value < low or value > high or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise JobInputError(f"must be in {bracket}{low}, {high}]", field)
        return float(value)

    return check


def _integer(low: int, high: Optional[int] = None) -> Callable[[str, Any], int]:
    def check(field: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise JobInputError("must be an integer", field)
        if value < low or (high is not None and value > high):
            raise JobInputError(f"must be an integer >= {low}" + (f" and <= {high}" if high else ""), field)
        return value

    return check


def _top_k(field: str, value: Any) -> int:
    value = _integer(-1, MAX_TOP_K)(field, value)
    return -1 if value == 0 else value  # 0 and -1 both mean "no top-k"


def _boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise JobInputError("must be true or false", field)
    return value


def _stop(field: str, value: Any) -> List[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise JobInputError("must be a string or a list of strings", field)
    for i, item in enumerate(items):
        if not isinstance(item, str) or item == "":
            raise JobInputError("must be a non-empty string", f"{field}[{i}]")
    return list(items)


SAMPLING_FIELDS: Dict[str, Callable[[str, Any], Any]] = {
    "max_tokens": _integer(1),
    "min_tokens": _integer(0),
    "temperature": _number(0.0, 100.0),
    "top_p": _number(0.0, 1.0, low_open=True),
    "top_k": _top_k,
    "min_p": _number(0.0, 1.0),
    "repetition_penalty": _number(0.0, 100.0, low_open=True),
    "presence_penalty": _number(-2.0, 2.0),
    "frequency_penalty": _number(-2.0, 2.0),
    "stop": _stop,
    "seed": _integer(0, 2**63 - 1),
    "n": _integer(1),  # and at most InputLimits.max_n
    "ignore_eos": _boolean,
}
INPUT_FIELDS = ("prompt", "messages", "sampling_params", "stream")


def parse_job_input(raw: Any, default_max_tokens: int, limits: InputLimits = InputLimits()) -> JobInput:
    """Validate a job's ``input`` object; raise JobInputError naming the field at fault."""
    if not isinstance(raw, Mapping):
        raise JobInputError("must be an object with 'prompt' or 'messages'", "input")
    check_input_size(raw, limits, "input")
    _reject_unknown(raw, INPUT_FIELDS, "")

    has_prompt, has_messages = "prompt" in raw, "messages" in raw
    if has_prompt == has_messages:
        which = "both" if has_prompt else "neither"
        raise JobInputError(f"give exactly one of 'prompt' or 'messages' ({which} given)", "prompt")
    prompt = messages = None
    if has_prompt:
        prompt = raw["prompt"]
        if not isinstance(prompt, str) or prompt == "":
            raise JobInputError("must be a non-empty string", "prompt")
        check_prompt_chars(len(prompt), "prompt", limits)
    else:
        messages = _messages(raw["messages"], limits)
        check_prompt_chars(sum(len(m["content"]) for m in messages), "messages", limits)

    stream = _boolean("stream", raw.get("stream", False))
    sampling, max_tokens_given = _sampling(raw.get("sampling_params", {}), default_max_tokens, limits)
    return JobInput(prompt, messages, sampling, stream, max_tokens_given)


def _reject_unknown(obj: Mapping, allowed: Tuple[str, ...], prefix: str) -> None:
    for key in obj:
        if key not in allowed:
            raise JobInputError(f"unknown field; allowed: {', '.join(allowed)}", _key_path(prefix, key))


def _key_path(prefix: str, key: Any) -> str:
    """``prefix`` + key; a key that is empty or holds . [ ] or " is quoted: ``input[""]``."""
    if isinstance(key, str) and key and not any(c in key for c in '.[]"'):
        return f"{prefix}{key}"
    return f"{prefix.rstrip('.') or 'input'}[{json.dumps(str(key), ensure_ascii=False)}]"


def _messages(value: Any, limits: InputLimits) -> Tuple[Dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise JobInputError("must be a non-empty list of {role, content} objects", "messages")
    check_count(len(value), limits.max_messages, "MAX_MESSAGES", "messages", "messages")
    out = []
    for i, item in enumerate(value):
        field = f"messages[{i}]"
        if not isinstance(item, Mapping):
            raise JobInputError("must be an object with 'role' and 'content'", field)
        _reject_unknown(item, ("role", "content"), field + ".")
        role = item.get("role")
        if role not in ROLES:
            raise JobInputError(f"must be one of {', '.join(ROLES)}", field + ".role")
        out.append({"role": role, "content": join_text_parts(item.get("content"), field + ".content")})
    return tuple(out)


def _sampling(value: Any, default_max_tokens: int, limits: InputLimits) -> Tuple[Dict[str, Any], bool]:
    if not isinstance(value, Mapping):
        raise JobInputError("must be an object", "sampling_params")
    _reject_unknown(value, tuple(SAMPLING_FIELDS), "sampling_params.")
    sampling = {
        key: SAMPLING_FIELDS[key](f"sampling_params.{key}", item)
        for key, item in value.items()
        if item is not None
    }
    _check_sampling_limits(sampling, limits)
    max_tokens_given = "max_tokens" in sampling
    sampling.setdefault("max_tokens", default_max_tokens)  # min_tokens <= max_tokens: see prepare_prompt
    return sampling, max_tokens_given


def _check_sampling_limits(sampling: Dict[str, Any], limits: InputLimits, prefix: str = "sampling_params.") -> None:
    n = sampling.get("n")
    if isinstance(n, int):
        check_count(n, limits.max_n, "MAX_N", "choices", prefix + "n")
    stop = sampling.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    check_count(len(stop), limits.max_stop_strings, "MAX_STOP_STRINGS", "stop strings", prefix + "stop")
    for i, item in enumerate(stop):
        if isinstance(item, str):
            check_count(len(item), limits.max_stop_length, "MAX_STOP_LENGTH", "characters", f"{prefix}stop[{i}]")


def check_openai_limits(body: Mapping[str, Any], limits: InputLimits) -> None:
    """The input limits on an OpenAI request body, fields named as the body names them.

    Only values of the right type are measured; vLLM's own validation names the rest.
    """
    check_input_size(body, limits, "openai_input")
    _check_sampling_limits(body, limits, prefix="")
    prompt, messages = body.get("prompt"), body.get("messages")
    if prompt is not None:  # /v1/completions: a string, or a list of strings (or token ids)
        prompts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
        check_prompt_chars(sum(len(p) for p in prompts if isinstance(p, str)), "prompt", limits)
    if isinstance(messages, list):
        check_count(len(messages), limits.max_messages, "MAX_MESSAGES", "messages", "messages")
        check_prompt_chars(sum(_text_chars(m.get("content")) for m in messages if isinstance(m, Mapping)),
                           "messages", limits)
    _check_responses_input(body, limits)


def _check_responses_input(body: Mapping[str, Any], limits: InputLimits) -> None:
    """/v1/responses: ``input`` (a string or a list of items) and ``instructions`` become the
    chat messages together, so their text counts together, named ``input``."""
    items, instructions = body.get("input"), body.get("instructions")
    chars = len(instructions) if isinstance(instructions, str) else 0
    if isinstance(items, str):
        chars += len(items)
    elif isinstance(items, list):
        check_count(len(items), limits.max_messages, "MAX_MESSAGES", "input items", "input")
        chars += sum(_text_chars(item.get("content")) for item in items if isinstance(item, Mapping))
    check_prompt_chars(chars, "input", limits)


def _text_chars(content: Any) -> int:
    """Characters of a message's text: a string, or the text of its content parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return 0
