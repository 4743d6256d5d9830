"""Chunk batching: first delta at once, then every N tokens or T ms."""

from gams_worker.jobs.streaming import ChunkBatcher


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_first_delta_flushes_at_once_then_by_token_count():
    clock = Clock()
    batcher = ChunkBatcher(batch_tokens=3, batch_ms=1000, clock=clock)
    assert batcher.add(0, "Lju", 1) == [{"index": 0, "text": "Lju"}]
    assert batcher.add(0, "bl", 1) is None
    assert batcher.add(0, "ja", 1) is None
    assert batcher.add(0, "na", 1) == [{"index": 0, "text": "bljana"}]
    assert batcher.drain() == {}


def test_flush_by_time():
    clock = Clock()
    batcher = ChunkBatcher(batch_tokens=100, batch_ms=50, clock=clock)
    batcher.add(0, "a", 1)
    clock.now = 0.049
    assert batcher.add(0, "b", 1) is None
    clock.now = 0.050
    assert batcher.add(0, "c", 1) == [{"index": 0, "text": "bc"}]


def test_choices_are_kept_apart_and_drain_returns_the_rest():
    clock = Clock()
    batcher = ChunkBatcher(batch_tokens=2, batch_ms=1000, clock=clock)
    batcher.add(1, "x", 1)
    batcher.add(0, "č", 1)
    assert batcher.add(1, "š", 1) == [{"index": 0, "text": "č"}, {"index": 1, "text": "š"}]
    batcher.add(0, "ž", 1)
    assert batcher.drain() == {0: "ž"}


def test_empty_deltas_are_not_sent():
    batcher = ChunkBatcher(batch_tokens=1, batch_ms=0, clock=Clock())
    assert batcher.add(0, "", 1) is None  # e.g. a token held back by the detokenizer
    assert batcher.add(0, "a", 1) == [{"index": 0, "text": "a"}]
