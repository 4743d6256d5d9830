"""Chat messages, for plain and OpenAI jobs alike: roles, text parts, Gemma's chat rules and the
refusal of control tokens, each checked once (MAINTAINERS.md, "The input contract")."""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from gams_worker.errors import JobInputError
from gams_worker.jobs.chat_template import ChatTemplateFacts

ROLES = ("system", "developer", "user", "assistant")  # "developer" is OpenAI's name for a system message
# Content parts that are text, and the key of their text (vLLM reads a bare string in a part list as text too).
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
PLAIN_TEXT_PARTS = ("text", "input_text", "output_text")


def key_path(prefix: str, key: Any) -> str:
    """``prefix`` + key; a key that is empty or holds . [ ] or " is quoted: ``input[""]``."""
    if isinstance(key, str) and key and not any(c in key for c in '.[]"'):
        return f"{prefix}{key}"
    return f"{prefix.rstrip('.') or 'input'}[{json.dumps(str(key), ensure_ascii=False)}]"


def strings_in(value: Any, field: str) -> Iterator[Tuple[str, str]]:
    """(path, text) of every string inside ``value``, in order, without recursion; keys are not texts."""
    stack: List[Tuple[str, Any]] = [(field, value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            yield path, node
        elif isinstance(node, Mapping):
            stack.extend(reversed([(key_path(path + ".", key), child) for key, child in node.items()]))
        elif isinstance(node, list):
            stack.extend(reversed([(f"{path}[{i}]", child) for i, child in enumerate(node)]))


def reject_unknown(obj: Mapping, allowed: Tuple[str, ...], prefix: str) -> None:
    for key in obj:
        if key not in allowed:
            raise JobInputError(f"unknown field; allowed: {', '.join(allowed)}", key_path(prefix, key))


def join_text_parts(content: Any, field: str) -> str:
    """A plain job's content: a string, or text parts [{"type": "text", "text": "..."}] joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        for i, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") in PLAIN_TEXT_PARTS
                    and isinstance(part.get("text"), str)):
                raise JobInputError("only text parts {type: 'text', text: '...'} are supported", f"{field}[{i}]")
        return "".join(part["text"] for part in content)
    raise JobInputError("must be a string or a list of text parts", field)


def check_message(message: Any, field: str, plain: bool) -> None:
    """A message object with a served role; a plain job's has no other key than role and content, an
    OpenAI one's content is none, a string, or a list of text parts (GaMS reads text only)."""
    if not isinstance(message, Mapping):
        raise JobInputError("must be an object with 'role' and 'content'", field)
    if plain:
        reject_unknown(message, ("role", "content"), field + ".")
        if message.get("role") not in ROLES:
            raise JobInputError(f"must be one of {', '.join(ROLES)}", field + ".role")
        return
    if message.get("role") not in ROLES:
        _refuse_role(message.get("role"), field + ".role")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise JobInputError("must be a string or a list of text parts", field + ".content")
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if not isinstance(part, str) and (kind not in TEXT_PARTS or not isinstance(part.get(TEXT_PARTS[kind]), str)):
            raise JobInputError(f"only text parts are served ({', '.join(TEXT_PARTS)}, each with its text): "
                                "GaMS reads text only", f"{field}.content[{i}]")


def _refuse_role(role: Any, field: str) -> None:
    raise JobInputError(f"role {role!r} is not served: roles are {', '.join(ROLES)} "
                        "(GaMS's chat template has no tool turns)", field)


def refuse_control_tokens(value: Any, field: str, template: Optional[ChatTemplateFacts]) -> None:
    """JobInputError naming the first string in ``value`` holding a control token's text (a real turn marker
    once the rendered template is tokenized whole)."""
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


@functools.lru_cache(maxsize=None)  # one per tokenizer
def _control_token_pattern(tokens: Tuple[str, ...]) -> "re.Pattern[str]":
    return re.compile("|".join(re.escape(token) for token in tokens))


def chat_roles(messages: Sequence[Any]) -> List[Dict[str, Any]]:
    """The messages as dicts with the roles the template knows: ``developer`` becomes ``system``."""
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise JobInputError("must be an object with 'role' and 'content'", f"messages[{i}]")
        message = dict(message)
        if message.get("role") == "developer":
            message["role"] = "system"
        if message.get("role") not in ("system", "user", "assistant"):
            _refuse_role(message.get("role"), f"messages[{i}].role")
        chat.append(message)
    return chat


def fold_system_message(messages: Sequence[Any]) -> List[Dict[str, Any]]:
    """Gemma 2 has no system role: a leading system message goes before the first user turn's text
    (other keys of a message and a user turn's content parts are kept)."""
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
    """The messages as the chat template gets them: a leading system message folded unless it renders one."""
    if template is not None and template.accepts_system:
        return chat_roles(messages)
    return fold_system_message(messages)
