"""A plain job's input validated into a typed ``JobInput`` and tokenized, and the input limits both
dialects share (``InputLimits``, gams_worker/config.py): checked before any tokenization or engine
work, a breach is a JobInputError naming the field; no limit ever truncates."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

from gams_worker.config import InputLimits
from gams_worker.errors import JobInputError, utf8_json
from gams_worker.jobs.chat_template import ChatTemplateFacts
from gams_worker.jobs.messages import (
    check_message, join_text_parts, refuse_control_tokens, reject_unknown, template_messages,
)

MAX_TOP_K = 2**31 - 1  # vLLM keeps top_k in int32; any value >= the vocabulary means "all"

MAX_JSON_DEPTH = 100  # Python's JSON encoder and decoder recurse once per level and fail near 1000


def nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and lists nest more than ``limit`` levels deep (the outermost is level 1), without recursion."""
    level = [value] if isinstance(value, (Mapping, list)) else []
    for _ in range(limit):
        level = [child for node in level for child in (node.values() if isinstance(node, Mapping) else node)
                 if isinstance(child, (Mapping, list))]
        if not level:
            return False
    return bool(level)


def small_json(value: Any, budget: int) -> bool:
    """Whether ``value`` holds at most ``budget`` string characters and items in all: a walk that stops as
    soon as it has counted more, so it costs at most about ``budget`` steps whatever the input."""
    pending = [value]
    while pending:
        node = pending.pop()
        budget -= 1 + (len(node) if isinstance(node, (str, Mapping, list)) else 0)
        if budget < 0:
            return False
        if isinstance(node, Mapping):
            pending += [*node.keys(), *node.values()]
        elif isinstance(node, list):
            pending += node
    return True


def encoded_json(raw: Any, field: str) -> bytes:
    """``raw`` as UTF-8 JSON; JobInputError for what is not plain JSON or not valid Unicode."""
    if nests_deeper_than(raw, MAX_JSON_DEPTH):
        raise JobInputError(f"nests objects and lists more than {MAX_JSON_DEPTH} levels deep", field)
    try:
        return utf8_json(raw, allow_nan=False)
    except UnicodeEncodeError:
        raise JobInputError("contains a lone surrogate (text that is not valid Unicode)", field) from None
    except (TypeError, ValueError, RecursionError):
        raise JobInputError("must be plain JSON (objects, lists, strings, finite numbers)", field) from None


def check_input_size(raw: Any, limits: InputLimits, field: str) -> None:
    """The whole input, serialized as the platform sent it, must fit ``max_input_bytes``."""
    encoded = encoded_json(raw, field)
    if len(encoded) > limits.max_input_bytes:
        raise JobInputError(f"is {len(encoded)} bytes as JSON; MAX_INPUT_BYTES allows at most "
                            f"{limits.max_input_bytes}", field)


def check_prompt_chars(chars: int, field: str, limits: InputLimits) -> None:
    if chars > limits.max_prompt_chars:
        raise JobInputError(f"is {chars} characters; MAX_PROMPT_CHARS allows at most {limits.max_prompt_chars}", field)


def check_count(count: int, maximum: int, variable: str, what: str, field: str) -> None:
    if count > maximum:
        raise JobInputError(f"has {count} {what}; {variable} allows at most {maximum}", field)


class JobInput(NamedTuple):
    prompt: Optional[str]
    messages: Optional[Tuple[Dict[str, str], ...]]  # {"role", "content"}, text parts joined
    sampling: Dict[str, Any]  # validated SamplingParams keyword arguments
    stream: bool
    max_tokens_given: bool  # False: max_tokens is the default and may be lowered to fit the model
    model: Optional[Tuple[str, str]] = None  # (field, name): the model or LoRA adapter the job names, as given


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
    "temperature": _number(0.0, 2.0),  # vLLM 0.32 refuses more
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
INPUT_FIELDS = ("prompt", "messages", "sampling_params", "stream", "lora", "model")


def parse_job_input(raw: Any, default_max_tokens: int, limits: InputLimits = InputLimits()) -> JobInput:
    """Validate a job's ``input`` object; raise JobInputError naming the field at fault."""
    if not isinstance(raw, Mapping):
        raise JobInputError("must be an object with 'prompt' or 'messages'", "input")
    check_input_size(raw, limits, "input")
    reject_unknown(raw, INPUT_FIELDS, "")

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
    return JobInput(prompt, messages, sampling, stream, max_tokens_given, _model(raw))


def _model(raw: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
    """(field, name) of the LoRA adapter (``lora``) or model (``model``: the served model or an adapter) named."""
    given = [field for field in ("lora", "model") if raw.get(field) is not None]
    if len(given) > 1:
        raise JobInputError("give one of 'lora' or 'model', not both", "lora")
    for field in given:
        if not isinstance(raw[field], str) or not raw[field]:
            raise JobInputError("must be a non-empty string: a LoRA adapter's name", field)
        return field, raw[field]
    return None


def _messages(value: Any, limits: InputLimits) -> Tuple[Dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise JobInputError("must be a non-empty list of {role, content} objects", "messages")
    check_count(len(value), limits.max_messages, "MAX_MESSAGES", "messages", "messages")
    out = []
    for i, item in enumerate(value):
        check_message(item, f"messages[{i}]", plain=True)
        out.append({"role": item["role"], "content": join_text_parts(item.get("content"), f"messages[{i}].content")})
    return tuple(out)


def _sampling(value: Any, default_max_tokens: int, limits: InputLimits) -> Tuple[Dict[str, Any], bool]:
    if not isinstance(value, Mapping):
        raise JobInputError("must be an object", "sampling_params")
    reject_unknown(value, tuple(SAMPLING_FIELDS), "sampling_params.")
    sampling = {key: SAMPLING_FIELDS[key](f"sampling_params.{key}", item) for key, item in value.items()
                if item is not None}
    check_sequences(sampling.get("n", 1), 1, limits, "sampling_params.n")
    check_stop_strings(sampling.get("stop", []), limits, "sampling_params.stop")
    max_tokens_given = "max_tokens" in sampling
    sampling.setdefault("max_tokens", default_max_tokens)  # min_tokens <= max_tokens: see prepare_prompt
    return sampling, max_tokens_given


def check_sequences(n: int, prompts: int, limits: InputLimits, n_field: str, prompts_field: str = "") -> None:
    """``n`` choices for each of ``prompts`` prompts: at most MAX_N choices, MAX_SEQUENCES in all
    (named by ``n_field``, or by ``prompts_field`` where a list of prompts multiplies them)."""
    check_count(n, limits.max_n, "MAX_N", "choices", n_field)
    if n * prompts > limits.max_sequences:
        raise JobInputError(f"asks for {prompts} prompts x {n} choices = {n * prompts} sequences; "
                            f"MAX_SEQUENCES allows at most {limits.max_sequences} per job",
                            n_field if prompts == 1 else prompts_field)


def check_stop_strings(stop: List[str], limits: InputLimits, field: str) -> None:
    check_count(len(stop), limits.max_stop_strings, "MAX_STOP_STRINGS", "stop strings", field)
    for i, item in enumerate(stop):
        check_count(len(item), limits.max_stop_length, "MAX_STOP_LENGTH", "characters", f"{field}[{i}]")


class PreparedPrompt(NamedTuple):
    token_ids: List[int]
    sampling: Dict[str, Any]  # with max_tokens fitted to the model length


def plain_chat_messages(messages: Tuple[Dict[str, str], ...],
                        template: Optional[ChatTemplateFacts]) -> List[Dict[str, Any]]:
    """A plain job's validated messages as the template gets them: control tokens refused, chat rules applied."""
    refuse_control_tokens(list(messages), "messages", template)  # roles are ROLES: only contents can hold one
    return template_messages(messages, template)


def prepare_prompt(job: JobInput, tokenizer: Any, max_model_len: int,
                   template: Optional[ChatTemplateFacts] = None) -> PreparedPrompt:
    """Tokenize the prompt (through the chat template for messages) and fit max_tokens."""
    field = "prompt" if job.messages is None else "messages"
    token_ids = _token_ids(job, tokenizer, template)
    room = max_model_len - len(token_ids)
    if room < 1:
        raise JobInputError(f"is {len(token_ids)} tokens; MAX_MODEL_LEN is {max_model_len}, leaving no room to "
                            "generate", field)
    sampling = dict(job.sampling)
    if sampling["max_tokens"] > room:
        if job.max_tokens_given:
            raise JobInputError(f"is {sampling['max_tokens']} but the prompt is {len(token_ids)} tokens and "
                                f"MAX_MODEL_LEN is {max_model_len}: at most {room}", "sampling_params.max_tokens")
        sampling["max_tokens"] = room  # the default shrinks to fit; an explicit value is never cut
    if sampling.get("min_tokens", 0) > sampling["max_tokens"]:
        raise JobInputError(f"must not exceed max_tokens ({sampling['max_tokens']})", "sampling_params.min_tokens")
    return PreparedPrompt(token_ids, sampling)


def _token_ids(job: JobInput, tokenizer: Any, template: Optional[ChatTemplateFacts]) -> List[int]:
    if job.messages is None:
        return tokenizer.encode(job.prompt, add_special_tokens=True)
    chat = plain_chat_messages(job.messages, template)
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template's own raise_exception, or a Jinja error
        raise JobInputError(f"the model's chat template refused these messages: {exc}", "messages") from exc
    return tokenizer.encode(text, add_special_tokens=False)  # the template already wrote <bos>
