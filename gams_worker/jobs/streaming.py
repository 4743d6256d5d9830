"""One flush policy for every stream (plain text deltas, OpenAI SSE events): a stream flushes its first text
at once, then every ``batch_tokens`` tokens or ``batch_ms``, never more often than ``streams / posts_per_s``
seconds, so all streams stay within the POST budget (MAINTAINERS.md, "Chunk batching and the POST budget")."""

from __future__ import annotations

import time
from typing import Callable, Dict, Generic, Iterable, List, Optional, Tuple, TypeVar

Piece = TypeVar("Piece")


class FlushPolicy:
    """The worker's one flush policy: the cadence of few streams, and the POST budget over all of them."""

    def __init__(self, batch_tokens: int, batch_ms: int, posts_per_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.batch_tokens = batch_tokens
        self.batch_s = batch_ms / 1000.0
        self.posts_per_s = posts_per_s
        self.clock = clock
        self.streams = 0  # streams that have flushed their first chunk and not ended

    def min_interval_s(self) -> float:
        """The shortest time between two flushes of one stream, at the current load."""
        return self.streams / self.posts_per_s

    def summary(self) -> str:
        """The policy in one start-up log line."""
        few = int(self.posts_per_s * self.batch_s)
        return (f"stream chunks: the first at once, then every {self.batch_tokens} tokens or "
                f"{self.batch_s * 1000:g} ms; beyond {few} streams at once, each stream's chunks at most every "
                f"(streams / {self.posts_per_s:g}) s, so that all streams together POST at most "
                f"{self.posts_per_s:g} times a second (STREAM_BATCH_TOKENS, STREAM_BATCH_MS, STREAM_POSTS_PER_SECOND)")

    def stream(self) -> "StreamBatcher":
        """A batcher for one stream; ``close()`` it when the stream ends."""
        return StreamBatcher(self)


class StreamBatcher(Generic[Piece]):
    def __init__(self, policy: FlushPolicy):
        self._policy = policy
        self._pieces: List[Piece] = []
        self._tokens = 0
        self._has_text = False
        self._last_flush: Optional[float] = None  # None: nothing flushed yet (not counted in the policy's streams)

    def add(self, piece: Piece, tokens: int, has_text: bool) -> Optional[List[Piece]]:
        """Gather one piece; return the pieces to send when a flush is due, else None."""
        self._pieces.append(piece)
        self._tokens += tokens
        self._has_text = self._has_text or has_text
        if not self._has_text:
            return None
        now = self._policy.clock()
        if self._last_flush is not None:
            since = now - self._last_flush
            if self._tokens < self._policy.batch_tokens and since < self._policy.batch_s:
                return None
            if since < self._policy.min_interval_s():
                return None  # the worker's POST budget, shared by all its streams
        else:
            self._policy.streams += 1
        self._last_flush = now
        return self.drain()

    def drain(self) -> List[Piece]:
        pieces, self._pieces, self._tokens, self._has_text = self._pieces, [], 0, False
        return pieces

    def close(self) -> None:
        """The stream ended: it no longer counts against the POST budget."""
        if self._last_flush is not None:
            self._policy.streams -= 1
            self._last_flush = None


def text_by_choice(deltas: Iterable[Tuple[int, str]]) -> Dict[int, str]:
    """(choice index, text delta) pieces joined into each choice's text."""
    texts: Dict[int, str] = {}
    for index, text in deltas:
        texts[index] = texts.get(index, "") + text
    return texts
