"""Turning a validated job input into prompt token ids that fit the model.

Messages go through the model's own chat template. Where the template refuses a
``system`` role (Gemma 2; see gams_worker.jobs.chat_template), a leading system message
is folded into the first user turn (separated by a blank line) instead of failing the job.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

from gams_worker.errors import JobInputError
from gams_worker.jobs.chat_template import ChatTemplateFacts
from gams_worker.jobs.input import JobInput, Message


@dataclasses.dataclass(frozen=True)
class PreparedPrompt:
    token_ids: List[int]
    sampling: Dict[str, Any]  # with max_tokens fitted to the model length


def fold_system_message(messages: Sequence[Message]) -> List[Dict[str, str]]:
    """Gemma has no system role: prepend a leading system message to the first user turn."""
    chat = [{"role": m.role, "content": m.content} for m in messages]
    for i, message in enumerate(chat[1:], start=1):
        if message["role"] == "system":
            raise JobInputError("a system message may only come first", f"messages[{i}].role")
    if chat[0]["role"] != "system":
        return chat
    system, rest = chat[0]["content"], chat[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}] + rest[1:]
    return [{"role": "user", "content": system}] + rest


def prepare_prompt(job: JobInput, tokenizer: Any, max_model_len: int,
                   template: Optional[ChatTemplateFacts] = None) -> PreparedPrompt:
    """Tokenize the prompt (through the chat template for messages) and fit max_tokens.

    ``template`` says whether the chat template takes a system role; without it, fold.
    """
    if job.messages is not None:
        field = "messages"
        if template is not None and template.accepts_system:
            chat = [{"role": m.role, "content": m.content} for m in job.messages]
        else:
            chat = fold_system_message(job.messages)
        try:
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except JobInputError:
            raise
        except Exception as exc:  # the template's own raise_exception, or a Jinja error
            raise JobInputError(f"the model's chat template refused these messages: {exc}", field) from exc
        # The template already wrote <bos>; adding special tokens again would double it.
        token_ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        field = "prompt"
        token_ids = tokenizer.encode(job.prompt, add_special_tokens=True)

    room = max_model_len - len(token_ids)
    if room < 1:
        raise JobInputError(
            f"is {len(token_ids)} tokens; MAX_MODEL_LEN is {max_model_len}, leaving no room to generate", field
        )
    sampling = dict(job.sampling)
    if sampling["max_tokens"] > room:
        if job.max_tokens_given:
            raise JobInputError(
                f"is {sampling['max_tokens']} but the prompt is {len(token_ids)} tokens and MAX_MODEL_LEN is "
                f"{max_model_len}: at most {room}",
                "sampling_params.max_tokens",
            )
        sampling["max_tokens"] = room  # the default shrinks to fit; an explicit value is never cut
    if sampling.get("min_tokens", 0) > sampling["max_tokens"]:
        raise JobInputError(f"must not exceed {sampling['max_tokens']}", "sampling_params.min_tokens")
    return PreparedPrompt(token_ids, sampling)
