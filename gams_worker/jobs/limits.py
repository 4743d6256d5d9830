"""Size limits on a job's input, checked before any tokenization or engine work.

A job over a limit gets an error naming the field (plain and OpenAI jobs alike); no limit
ever truncates. The defaults (each overridable by the environment variable in brackets):

- ``max_input_bytes`` [MAX_INPUT_BYTES] 1 MiB: the whole ``input`` (an OpenAI job's request
  body) as UTF-8 JSON. RunPod
  itself accepts up to 10 MB (/run) and 20 MB (/runsync); nothing that fits GaMS's context
  comes near 1 MiB, and it bounds the worker's memory and parsing time per job.
- ``max_prompt_chars`` [MAX_PROMPT_CHARS] 200,000: the prompt, or all message contents
  together. GaMS's 8192-token context holds roughly 40,000 characters of Slovene; the rest is
  headroom for unusual tokenizations. It bounds tokenizer time, which runs on the event loop.
- ``max_messages`` [MAX_MESSAGES] 256 chat messages.
- ``max_stop_strings`` [MAX_STOP_STRINGS] 16 and ``max_stop_length`` [MAX_STOP_LENGTH] 256
  characters each: vLLM checks every stop string against new text at every step.
- ``max_n`` [MAX_N] 16 choices per job: each choice is a sequence in the batch.

``max_tokens`` is bounded by MAX_MODEL_LEN minus the prompt's tokens (gams_worker/jobs/chat.py).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from gams_worker.errors import JobInputError


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
