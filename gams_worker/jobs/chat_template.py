"""What the model's chat template does, learned once at start-up by rendering it: the token that ends an
assistant turn (chat jobs stop there whatever generation_config.json lists), whether it renders a system
message, and the control tokens chat messages may not carry (MAINTAINERS.md, "Stop at the end of the turn")."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

log = logging.getLogger(__name__)

PROBE_TEXT = "GAMSWORKERPROBE"  # text no template writes by itself, found again in the rendered probes
CHAT_JOBS = "chat jobs (messages, OpenAI chat, Responses)"


@dataclasses.dataclass(frozen=True)
class ChatTemplateFacts:
    end_of_turn_id: Optional[int]  # None: the template writes no special token after a turn
    end_of_turn_token: Optional[str]
    accepts_system: bool  # False: fold a leading system message into the first user turn
    control_tokens: Tuple[str, ...] = ()  # special tokens' text, longest first: refused in chat messages


def probe_chat_template(tokenizer: Any) -> ChatTemplateFacts:
    """Render probe conversations with the tokenizer's chat template and read its behaviour."""
    end_of_turn_id, end_of_turn_token = find_end_of_turn(tokenizer) or (None, None)
    return ChatTemplateFacts(end_of_turn_id, end_of_turn_token, accepts_system=accepts_system_role(tokenizer),
                             control_tokens=control_tokens(tokenizer))


def control_tokens(tokenizer: Any) -> Tuple[str, ...]:
    """The text of every special token, as the tokenizer would find it inside rendered text."""
    texts = {tokenizer.convert_ids_to_tokens(token_id) for token_id in _special_ids(tokenizer)}
    return tuple(sorted((t for t in texts if isinstance(t, str) and t), key=lambda t: (-len(t), t)))


def find_end_of_turn(tokenizer: Any) -> Optional[Tuple[int, str]]:
    """(id, text) of the special token the template writes right after an assistant message."""
    conversation = [{"role": "user", "content": "A"}, {"role": "assistant", "content": PROBE_TEXT}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception as exc:  # no template, or one that refuses even this conversation
        log.warning("the chat template could not render a probe conversation: %s", exc)
        return None
    _, found, after = text.partition(PROBE_TEXT)
    following = tokenizer.encode(after, add_special_tokens=False) if found else []
    if not following or following[0] not in _special_ids(tokenizer):
        return None
    return following[0], tokenizer.convert_ids_to_tokens(following[0])


def accepts_system_role(tokenizer: Any) -> bool:
    """Whether the template renders a leading system message (it neither raises nor drops it)."""
    conversation = [{"role": "system", "content": PROBE_TEXT}, {"role": "user", "content": "A"}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception:  # Gemma 2: raise_exception('System role not supported')
        return False
    return PROBE_TEXT in text


def _special_ids(tokenizer: Any) -> set:
    ids = set(tokenizer.all_special_ids)
    ids.update(token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def stop_at_end_of_turn(params: Any, facts: ChatTemplateFacts, model_eos_id: Optional[int]) -> Any:
    """Make a chat request's SamplingParams (changed in place, and returned) stop at the end-of-turn token,
    merged as vLLM merges generation_config.json's EOS ids: ``min_tokens`` and ``ignore_eos`` apply to it."""
    if facts.end_of_turn_id is not None:
        params.update_from_generation_config({"eos_token_id": [facts.end_of_turn_id]}, model_eos_id)
    return params


class StopTokenReport(NamedTuple):
    line: str  # which stop ids are in force and where each came from
    warning: Optional[str]  # set when the generation config lacks the end-of-turn token


def report_stop_tokens(facts: ChatTemplateFacts, tokenizer: Any, generation_config: Dict[str, Any],
                       generation_config_file: str) -> StopTokenReport:
    """Describe the stop ids of every job kind and where each came from."""
    all_jobs: Dict[int, List[str]] = {}
    if tokenizer.eos_token_id is not None:
        all_jobs.setdefault(tokenizer.eos_token_id, []).append("tokenizer eos_token")
    configured = generation_config.get("eos_token_id")
    configured = [configured] if isinstance(configured, int) else list(configured or ())
    for token_id in configured:
        all_jobs.setdefault(token_id, []).append(f"{generation_config_file} eos_token_id")

    def name(token_id: int) -> str:
        return f"{tokenizer.convert_ids_to_tokens(token_id)}={token_id}"

    parts = ["all jobs: " + ", ".join(f"{name(i)} ({'; '.join(s)})" for i, s in all_jobs.items())]
    warning = None
    if facts.end_of_turn_id is None:
        parts.append(f"{CHAT_JOBS}: nothing more (the chat template writes no special token after a turn)")
    elif facts.end_of_turn_id in all_jobs:
        parts.append(f"{CHAT_JOBS}: nothing more (the chat template's end of turn is among them)")
    else:
        parts.append(f"{CHAT_JOBS} also: {name(facts.end_of_turn_id)} (the chat template's end of turn)")
        warning = (f"{generation_config_file} lacks the chat template's end-of-turn token "
                   f"{name(facts.end_of_turn_id)}: the worker stops {CHAT_JOBS} there anyway; "
                   f"plain prompt jobs and /v1/completions stop only at the ids listed for all jobs")
    return StopTokenReport("stop tokens: " + "; ".join(parts), warning)


def log_chat_template(engine: Any, tokenizer: Any, facts: ChatTemplateFacts) -> None:
    model_config = engine.model_config
    file = "generation_config.json" if (Path(model_config.model) / "generation_config.json").is_file() else \
        "config.json (there is no generation_config.json)"
    report = report_stop_tokens(facts, tokenizer, model_config.try_get_generation_config(), file)
    log.info(report.line)
    if report.warning:
        log.warning(report.warning)
    log.info("chat template: system role %s", "rendered as is" if facts.accepts_system else
             "refused, so a leading system message is folded into the first user turn")
