"""The compilation config of the fallback ladder's PIECEWISE rung on a GPU: PIECEWISE graphs only, hashed as
the FULL rung's (FULL_AND_PIECEWISE), so that the rung loads what the FULL rung compiled instead of paying
a second cold compile. The compiled pieces of both modes are the same: vLLM itself runs the pieces it
compiled for FULL_AND_PIECEWISE as PIECEWISE where an attention backend cannot be captured whole."""

from __future__ import annotations

import copy

from vllm.config import CompilationConfig
from vllm.config.compilation import CUDAGraphMode


class PiecewiseRungConfig(CompilationConfig):
    def compute_hash(self) -> str:
        """vLLM's hash of this config as the FULL rung has it (the key of its compile cache)."""
        as_full = copy.copy(self)
        as_full.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
        return CompilationConfig.compute_hash(as_full)
