"""Gemma's chat rules, for plain and OpenAI jobs alike, and a plain job's prompt as token ids.

Message content is a string or OpenAI-style text parts. Where the model's chat template
refuses a ``system`` role (Gemma 2; gams_worker/jobs/chat_template.py learns it at start-up),
a leading system message is folded into the first user turn (separated by a blank line)
instead of failing the job, and a system message anywhere else is an error; where the
template renders a system role (Gemma 3), messages go to it as they are.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

from gams_worker.errors import JobInputError
from gams_worker.jobs.chat_template import ChatTemplateFacts

if TYPE_CHECKING:  # gams_worker.jobs.input applies these rules as it validates
    from gams_worker.jobs.input import JobInput


@dataclasses.dataclass(frozen=True)
class PreparedPrompt:
    token_ids: List[int]
    sampling: Dict[str, Any]  # with max_tokens fitted to the model length


def join_text_parts(content: Any, field: str) -> str:
    """A string, or OpenAI-style text parts [{"type": "text", "text": "..."}] joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise JobInputError("only text parts {type: 'text', text: '...'} are supported", f"{field}[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    raise JobInputError("must be a string or a list of text parts", field)


def fold_system_message(messages: Sequence[Any]) -> List[Dict[str, Any]]:
    """Gemma has no system role: prepend a leading system message to the first user turn.

    Other keys of a message (an OpenAI ``name``) and a user turn's content parts are kept.
    """
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise JobInputError("must be an object with 'role' and 'content'", f"messages[{i}]")
        if i > 0 and message.get("role") == "system":
            raise JobInputError("a system message may only come first (Gemma 2 has no system role)",
                                f"messages[{i}].role")
    chat = [dict(message) for message in messages]
    if not chat or chat[0].get("role") != "system":
        return chat
    system, rest = join_text_parts(chat[0].get("content"), "messages[0].content"), chat[1:]
    if not rest or rest[0].get("role") != "user":
        return [{"role": "user", "content": system}] + rest
    content = rest[0].get("content")
    if isinstance(content, str):
        rest[0]["content"] = f"{system}\n\n{content}"
    elif isinstance(content, list):
        rest[0]["content"] = [{"type": "text", "text": f"{system}\n\n"}] + content
    else:
        raise JobInputError("must be a string or a list of content parts", "messages[1].content")
    return rest


def template_messages(messages: Sequence[Any], template: Optional[ChatTemplateFacts]) -> List[Dict[str, Any]]:
    """The messages as the chat template gets them, for both dialects: a leading system message
    folded where the template refuses a system role (``template`` None: not known, so fold)."""
    if template is not None and template.accepts_system:
        return list(messages)
    return fold_system_message(messages)


def prepare_prompt(job: JobInput, tokenizer: Any, max_model_len: int,
                   template: Optional[ChatTemplateFacts] = None) -> PreparedPrompt:
    """Tokenize the prompt (through the chat template for messages) and fit max_tokens.

    ``template`` says whether the chat template takes a system role (see template_messages).
    """
    if job.messages is not None:
        field = "messages"
        chat = template_messages(job.messages, template)
        try:
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
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
        raise JobInputError(f"must not exceed max_tokens ({sampling['max_tokens']})", "sampling_params.min_tokens")
    return PreparedPrompt(token_ids, sampling)
