"""Batching of engine text deltas into job output chunks.

Every chunk a job yields becomes one HTTP POST on RunPod, so deltas are gathered
and flushed when ``batch_tokens`` tokens have gathered or ``batch_ms`` have passed
since the last flush, whichever comes first. The first delta is flushed at once so
the user sees the first words as early as possible. The engine hands us ``str``
deltas from its incremental detokenizer, which holds back incomplete UTF-8
sequences, so a chunk never splits a character.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional


class ChunkBatcher:
    def __init__(self, batch_tokens: int, batch_ms: int, clock: Callable[[], float] = time.monotonic):
        self._batch_tokens = batch_tokens
        self._batch_s = batch_ms / 1000.0
        self._clock = clock
        self._texts: Dict[int, str] = {}
        self._tokens = 0
        self._last_flush: Optional[float] = None  # None: nothing flushed yet

    def add(self, index: int, text: str, num_tokens: int) -> Optional[List[Dict[str, Any]]]:
        """Gather one delta; return the choices to send when a flush is due, else None."""
        self._texts[index] = self._texts.get(index, "") + text
        self._tokens += num_tokens
        now = self._clock()
        due = (
            self._last_flush is None
            or self._tokens >= self._batch_tokens
            or now - self._last_flush >= self._batch_s
        )
        if not due or not any(self._texts.values()):
            return None
        return self._take(now)

    def drain(self) -> Dict[int, str]:
        """The text gathered and not yet sent, by choice index."""
        pending, self._texts, self._tokens = self._texts, {}, 0
        return pending

    def _take(self, now: float) -> List[Dict[str, Any]]:
        choices = [{"index": i, "text": t} for i, t in sorted(self._texts.items())]
        self._texts = {}
        self._tokens = 0
        self._last_flush = now
        return choices
