"""The worker's errors, the one shape a failed job reports (one output ``{"error": "<JSON text>"}``:
plain ``{"type", "message", "field"?}``, OpenAI ``{"message", "type", "param", "code"}``), and the
one JSON encoder for text that must reach the platform as UTF-8 (MAINTAINERS.md, "Errors that always post")."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Dict, List, Optional

INVALID_INPUT = "invalid_input"  # the job's input is at fault; the next job is served
ENGINE_ERROR = "engine_error"  # the engine failed this request only
ENGINE_DEAD = "engine_dead"  # the engine died; the worker exits and RunPod replaces it
WORKER_ERROR = "worker_error"  # the worker itself failed on this job (a bug)
NOT_FOUND = "not_found"  # the job names a model (LoRA adapter) this worker does not serve: HTTP's 404


class WorkerError(Exception):
    """Base class of the worker's own errors."""


class ConfigError(WorkerError):
    """An environment variable has a value the worker cannot use."""

    def __init__(self, variable: str, value: str, allowed: str):
        self.variable = variable
        self.allowed = allowed
        super().__init__(f"{variable}={value!r} is invalid: expected {allowed}")


class JobInputError(WorkerError):
    """A job's input is malformed; ``field`` is the dotted path of the offending field."""

    def __init__(self, message: str, field: Optional[str] = None, type_: str = INVALID_INPUT):
        self.message = message
        self.field = field
        self.type = type_
        super().__init__(f"{field}: {message}" if field else message)

    def to_output(self) -> Dict[str, str]:
        return error_output(self.type, self.message, self.field)


class OpenAIRequestError(WorkerError):
    """An OpenAI request the worker refuses before vLLM sees it; ``param`` names the field."""

    def __init__(self, message: str, param: Optional[str] = None, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        self.message = message
        self.param = param
        self.status = status
        super().__init__(message)

    def to_output(self) -> Dict[str, str]:
        """OpenAI's error object, ``type`` named as vLLM names it."""
        error_type = {HTTPStatus.BAD_REQUEST: "BadRequestError", HTTPStatus.NOT_FOUND: "NotFoundError"}.get(
            self.status, "InternalServerError")
        return job_error_output({"message": self.message, "type": error_type, "param": self.param,
                                 "code": int(self.status)})


class EngineStartError(WorkerError):
    """The engine could not be started: ``cause`` in plain words, and the ladder's ``diagnosis`` (or None)."""

    def __init__(self, message: str, cause: str, diagnosis: Any = None):  # a startup.start_failure.Diagnosis
        self.cause = cause
        self.diagnosis = diagnosis
        super().__init__(message)


class ModelNotFoundError(WorkerError):
    """No usable copy of the model was found; ``searched`` lists each place and why it failed."""

    def __init__(self, model: str, searched: List[str]):
        super().__init__(f"model {model!r} was not found. Searched: {'; '.join(searched)}")
        self.searched = searched


class AdapterError(WorkerError):
    """A LoRA adapter LORA_MODULES names cannot be served: one line naming it and why."""

    def __init__(self, name: str, reason: str):
        self.adapter = name
        super().__init__(f"LoRA adapter {name!r} (LORA_MODULES): {reason}")


class IncompleteModelError(WorkerError):
    """A model directory lacks files or holds damaged ones; ``problems`` names each."""

    def __init__(self, path: str, problems: List[str]):
        super().__init__(f"model files in {path} are incomplete: " + "; ".join(problems))


def utf8_json(value: Any, **options: Any) -> bytes:
    """``value`` as UTF-8 JSON; UnicodeEncodeError for a lone surrogate."""
    return json.dumps(value, ensure_ascii=False, **options).encode("utf-8")


def sendable_json(value: Any, **options: Any) -> str:
    """``value`` as JSON text UTF-8 can always carry: a lone surrogate (echoed from a job's input)
    is written as JSON's ASCII escape (``\\ud800``) instead of failing the post that sends it."""
    try:
        return utf8_json(value, **options).decode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, **options)


def job_error_output(error: Dict[str, Any]) -> Dict[str, str]:
    """What a failed job yields: its error object as JSON text."""
    return {"error": sendable_json(error, default=str)}


def error_output(type_: str, message: str, field: Optional[str] = None) -> Dict[str, str]:
    error: Dict[str, Any] = {"type": type_, "message": message}
    if field is not None:
        error["field"] = field
    return job_error_output(error)
