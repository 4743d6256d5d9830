"""Gemma's chat rules, for plain and OpenAI jobs alike, and a plain job's prompt as token ids.

Message content is a string or OpenAI-style text parts. Roles are ``system``, ``developer``
(what OpenAI clients now send for instructions: it is a system message), ``user`` and
``assistant``; any other role is an error naming it. Where the model's chat template refuses a
``system`` role (Gemma 2; gams_worker/jobs/chat_template.py learns it at start-up), a leading
system (or developer) message is folded into the first user turn (separated by a blank line)
instead of failing the job, and one anywhere else is an error; where the template renders a
system role (Gemma 3), messages go to it as they are, developer messages as system ones.

The text of a chat job may not hold the tokenizer's control tokens (``<start_of_turn>``,
``<end_of_turn>``, ``<bos>``, ...): the rendered template is tokenized as a whole, so such text
would become the real token and let a user forge turns, a system turn among them. It is refused
with an error naming the field (refuse_control_tokens). Plain ``prompt`` jobs and
/v1/completions prompts are raw text the caller owns, special tokens included.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from gams_worker.errors import JobInputError
from gams_worker.jobs.chat_template import ChatTemplateFacts
from gams_worker.jobs.input import JobInput, join_text_parts, strings_in


@dataclasses.dataclass(frozen=True)
class PreparedPrompt:
    token_ids: List[int]
    sampling: Dict[str, Any]  # with max_tokens fitted to the model length


CHAT_ROLES = ("system", "user", "assistant")  # what the chat template gets; "developer" becomes "system"


def refuse_control_tokens(value: Any, field: str, template: Optional[ChatTemplateFacts]) -> None:
    """JobInputError naming the first string inside ``value`` that holds a control token's text."""
    if template is None or not template.control_tokens:
        return
    pattern = _control_token_pattern(template.control_tokens)
    for path, text in strings_in(value, field):
        found = pattern.search(text)
        if found:
            raise JobInputError(
                f"contains the control token {found.group()!r}: chat messages may not hold the model's special "
                "tokens (they would be read as real turn markers); send them in a plain prompt job if you mean them",
                path)


_patterns: Dict[Tuple[str, ...], "re.Pattern[str]"] = {}


def _control_token_pattern(tokens: Tuple[str, ...]) -> "re.Pattern[str]":
    if tokens not in _patterns:  # one per tokenizer, built once
        _patterns[tokens] = re.compile("|".join(re.escape(token) for token in tokens))
    return _patterns[tokens]


def chat_roles(messages: Sequence[Any]) -> List[Dict[str, Any]]:
    """The messages as dicts with the roles the template knows: a ``developer`` message is a
    system message; a role the plain dialect does not serve (``tool``, ``function``...) is an error."""
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise JobInputError("must be an object with 'role' and 'content'", f"messages[{i}]")
        message = dict(message)
        if message.get("role") == "developer":
            message["role"] = "system"
        if message.get("role") not in CHAT_ROLES:
            raise JobInputError(f"role {message.get('role')!r} is not served: roles are system, developer, "
                                "user and assistant (GaMS's chat template has no tool turns)", f"messages[{i}].role")
        chat.append(message)
    return chat


def fold_system_message(messages: Sequence[Any]) -> List[Dict[str, Any]]:
    """Gemma has no system role: prepend a leading system message to the first user turn.

    Other keys of a message (an OpenAI ``name``) and a user turn's content parts are kept.
    """
    chat = chat_roles(messages)
    for i, message in enumerate(chat):
        if i > 0 and message["role"] == "system":
            raise JobInputError("a system (or developer) message may only come first (Gemma 2 has no system role)",
                                f"messages[{i}].role")
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
        return chat_roles(messages)
    return fold_system_message(messages)


def plain_chat_messages(messages: Sequence[Dict[str, str]], template: Optional[ChatTemplateFacts]) -> List[Dict[str, Any]]:
    """A plain job's validated messages as the template gets them: control tokens refused, roles
    and the system message ruled (template_messages)."""
    for i, message in enumerate(messages):
        refuse_control_tokens(message["content"], f"messages[{i}].content", template)
    return template_messages(messages, template)


def prepare_prompt(job: JobInput, tokenizer: Any, max_model_len: int,
                   template: Optional[ChatTemplateFacts] = None) -> PreparedPrompt:
    """Tokenize the prompt (through the chat template for messages) and fit max_tokens.

    ``template`` says whether the chat template takes a system role (see template_messages).
    """
    if job.messages is not None:
        field = "messages"
        chat = plain_chat_messages(job.messages, template)
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
