"""The LoRA adapters a job may name, one set for both dialects: vLLM's OpenAIServingModels loads them
(LORA_MODULES, checked at start) and routes OpenAI's ``model``; plain jobs take their LoRARequest from it
by name, so each adapter has one id in the engine. A name not served is a 404-style error naming the field."""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional, Sequence, Tuple

from gams_worker.errors import NOT_FOUND, JobInputError


class Adapters:
    """The adapters' names, the model's own names, and where their LoRARequests come from."""

    def __init__(self, names: Sequence[str], base_names: Sequence[str],
                 serving_models: Callable[[], Awaitable[Any]]):
        self.names = tuple(names)
        self.base_names = tuple(base_names)  # names of the model itself (SERVED_MODEL_NAME, MODEL_NAME)
        self._serving_models = serving_models  # vLLM's OpenAIServingModels, built (and adapters loaded) once

    def choose(self, named: Optional[Tuple[str, str]]) -> Optional[str]:
        """The adapter a job's (field, name) names; None for the model itself; JobInputError if none is served."""
        if named is None or named[1] in self.base_names:
            return None
        field, name = named
        if name not in self.names:
            served = ", ".join(self.base_names[:1] + self.names)
            raise JobInputError(f"no model or LoRA adapter {name!r} is served here; served: {served}", field,
                                NOT_FOUND)
        return name

    async def lora_request(self, name: Optional[str]) -> Any:
        """vLLM's LoRARequest of adapter ``name`` (None: the model itself)."""
        if name is None:
            return None
        return (await self._serving_models()).lora_requests[name]
