"""The one flush policy: first piece with text at once, then every N tokens or T ms."""

from gams_worker.jobs.streaming import StreamBatcher, text_by_choice


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_first_text_flushes_at_once_then_by_token_count():
    batcher = StreamBatcher(batch_tokens=3, batch_ms=1000, clock=Clock())
    assert batcher.add((0, "Lju"), 1, True) == [(0, "Lju")]
    assert batcher.add((0, "bl"), 1, True) is None
    assert batcher.add((0, "ja"), 1, True) is None
    assert batcher.add((0, "na"), 1, True) == [(0, "bl"), (0, "ja"), (0, "na")]
    assert batcher.drain() == []


def test_flush_by_time():
    clock = Clock()
    batcher = StreamBatcher(batch_tokens=100, batch_ms=50, clock=clock)
    batcher.add("a", 1, True)
    clock.now = 0.049
    assert batcher.add("b", 1, True) is None
    clock.now = 0.050
    assert batcher.add("c", 1, True) == ["b", "c"]


def test_pieces_without_text_wait_for_one_with_text():
    # A token the detokenizer holds back (empty delta), or a chat stream's role-only SSE event.
    batcher = StreamBatcher(batch_tokens=1, batch_ms=0, clock=Clock())
    assert batcher.add((0, ""), 1, False) is None
    assert batcher.add((0, "a"), 1, True) == [(0, ""), (0, "a")]
    sse = StreamBatcher(batch_tokens=3, batch_ms=100, clock=Clock())
    assert sse.add("data: role\n\n", 1, False) is None
    assert sse.add("data: t1\n\n", 1, True) == ["data: role\n\n", "data: t1\n\n"]  # first token at once
    assert sse.add("data: t2\n\n", 1, True) is None


def test_choices_are_kept_apart():
    batcher = StreamBatcher(batch_tokens=2, batch_ms=1000, clock=Clock())
    batcher.add((1, "x"), 1, True)
    batcher.add((0, "č"), 1, True)
    assert text_by_choice(batcher.add((1, "š"), 1, True)) == {0: "č", 1: "š"}
    batcher.add((0, "ž"), 1, True)
    assert text_by_choice(batcher.drain()) == {0: "ž"}
