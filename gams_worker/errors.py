"""Typed errors of the worker. Each carries what a user needs to fix the cause."""

from __future__ import annotations

from typing import Any, Dict, List, Optional


class WorkerError(Exception):
    """Base class of the worker's own errors."""


class ConfigError(WorkerError):
    """An environment variable has a value the worker cannot use."""

    def __init__(self, variable: str, value: str, allowed: str):
        self.variable = variable
        self.value = value
        self.allowed = allowed
        super().__init__(f"{variable}={value!r} is invalid: expected {allowed}")


class JobInputError(WorkerError):
    """A job's input is malformed; ``field`` is the dotted path of the offending field."""

    type = "invalid_input"

    def __init__(self, message: str, field: Optional[str] = None):
        self.message = message
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)

    def to_output(self) -> Dict[str, Any]:
        return error_output(self.type, self.message, self.field)


class EngineStartError(WorkerError):
    """The engine could not be started; ``cause`` is the classified root cause."""


class ModelNotFoundError(WorkerError):
    """No usable copy of the model was found; ``searched`` lists each place and why it failed."""

    def __init__(self, model: str, searched: List[str]):
        self.model = model
        self.searched = searched
        places = "; ".join(searched)
        super().__init__(f"model {model!r} was not found. Searched: {places}")


class IncompleteModelError(WorkerError):
    """A model directory lacks files or holds damaged ones; ``problems`` names each."""

    def __init__(self, path: str, problems: List[str]):
        self.path = path
        self.problems = problems
        super().__init__(f"model files in {path} are incomplete: " + "; ".join(problems))


def error_output(type_: str, message: str, field: Optional[str] = None) -> Dict[str, Any]:
    """The one shape of an error that a job yields."""
    error: Dict[str, Any] = {"type": type_, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}
