"""One flush policy for every stream: plain jobs' text deltas and OpenAI jobs' SSE events.

Every item a job yields becomes one HTTP POST on RunPod, so the pieces of a stream are
gathered and flushed when ``batch_tokens`` tokens have gathered or ``batch_ms`` have passed
since the last flush, whichever comes first. The first piece with text is flushed at once
so the user sees the first words as early as possible. The engine hands over ``str``
deltas from its incremental detokenizer, which holds back incomplete UTF-8 sequences, so
a flush never splits a character.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Generic, Iterable, List, Optional, Tuple, TypeVar

Piece = TypeVar("Piece")


class StreamBatcher(Generic[Piece]):
    def __init__(self, batch_tokens: int, batch_ms: int, clock: Callable[[], float] = time.monotonic):
        self._batch_tokens = batch_tokens
        self._batch_s = batch_ms / 1000.0
        self._clock = clock
        self._pieces: List[Piece] = []
        self._tokens = 0
        self._has_text = False
        self._last_flush: Optional[float] = None  # None: nothing flushed yet

    def add(self, piece: Piece, tokens: int, has_text: bool) -> Optional[List[Piece]]:
        """Gather one piece; return the pieces to send when a flush is due, else None."""
        self._pieces.append(piece)
        self._tokens += tokens
        self._has_text = self._has_text or has_text
        if not self._has_text:
            return None
        now = self._clock()
        if self._last_flush is not None and self._tokens < self._batch_tokens and now - self._last_flush < self._batch_s:
            return None
        self._last_flush = now
        return self.drain()

    def drain(self) -> List[Piece]:
        """The pieces gathered and not yet sent."""
        pieces, self._pieces, self._tokens, self._has_text = self._pieces, [], 0, False
        return pieces


def text_by_choice(deltas: Iterable[Tuple[int, str]]) -> Dict[int, str]:
    """(choice index, text delta) pieces joined into each choice's text."""
    texts: Dict[int, str] = {}
    for index, text in deltas:
        texts[index] = texts.get(index, "") + text
    return texts
