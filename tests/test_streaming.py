"""The one flush policy: first piece with text at once, then every N tokens or T ms, within the worker's POST budget."""

import math

from gams_worker.jobs.streaming import FlushPolicy, text_by_choice


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_first_text_flushes_at_once_then_by_token_count():
    batcher = FlushPolicy(batch_tokens=3, batch_ms=1000, posts_per_s=math.inf, clock=Clock()).stream()
    assert batcher.add((0, "Lju"), 1, True) == [(0, "Lju")]
    assert batcher.add((0, "bl"), 1, True) is None
    assert batcher.add((0, "ja"), 1, True) is None
    assert batcher.add((0, "na"), 1, True) == [(0, "bl"), (0, "ja"), (0, "na")]
    assert batcher.drain() == []


def test_flush_by_time():
    clock = Clock()
    batcher = FlushPolicy(batch_tokens=100, batch_ms=50, posts_per_s=math.inf, clock=clock).stream()
    batcher.add("a", 1, True)
    clock.now = 0.049
    assert batcher.add("b", 1, True) is None
    clock.now = 0.050
    assert batcher.add("c", 1, True) == ["b", "c"]


def test_pieces_without_text_wait_for_one_with_text():
    # A token the detokenizer holds back (empty delta), or a chat stream's role-only SSE event.
    batcher = FlushPolicy(batch_tokens=1, batch_ms=0, posts_per_s=math.inf, clock=Clock()).stream()
    assert batcher.add((0, ""), 1, False) is None
    assert batcher.add((0, "a"), 1, True) == [(0, ""), (0, "a")]
    sse = FlushPolicy(batch_tokens=3, batch_ms=100, posts_per_s=math.inf, clock=Clock()).stream()
    assert sse.add("data: role\n\n", 1, False) is None
    assert sse.add("data: t1\n\n", 1, True) == ["data: role\n\n", "data: t1\n\n"]  # first token at once
    assert sse.add("data: t2\n\n", 1, True) is None


def test_choices_are_kept_apart():
    batcher = FlushPolicy(batch_tokens=2, batch_ms=1000, posts_per_s=math.inf, clock=Clock()).stream()
    batcher.add((1, "x"), 1, True)
    batcher.add((0, "č"), 1, True)
    assert text_by_choice(batcher.add((1, "š"), 1, True)) == {0: "č", 1: "š"}
    batcher.add((0, "ž"), 1, True)
    assert text_by_choice(batcher.drain()) == {0: "ž"}


# ------------------------------------------------------------------ the POST budget over all streams
def test_few_streams_keep_the_cadence_of_one():
    clock = Clock()
    policy = FlushPolicy(batch_tokens=16, batch_ms=100, posts_per_s=500, clock=clock)
    streams = [policy.stream() for _ in range(8)]
    for stream in streams:
        assert stream.add("first", 1, True) == ["first"]  # first chunks at once
    assert policy.streams == 8 and policy.min_interval_s() == 8 / 500  # 16 ms: under 100 ms, no effect
    clock.now = 0.1
    assert all(stream.add("x", 1, True) == ["x"] for stream in streams)  # 100 ms: due, as alone
    clock.now = 0.12
    assert all(stream.add("y", 16, True) == ["y"] for stream in streams)  # 16 tokens: due before 100 ms
    for stream in streams:
        stream.close()
    assert policy.streams == 0


def test_many_streams_flush_no_more_often_than_the_budget_allows():
    clock = Clock()
    policy = FlushPolicy(batch_tokens=16, batch_ms=100, posts_per_s=500, clock=clock)
    streams = [policy.stream() for _ in range(512)]
    texts = {i: [] for i in range(512)}
    sent = {i: [] for i in range(512)}
    posts_after_first = 0
    for step in range(1, 1001):  # 2 s of engine steps, 2 ms apart, a token per stream each
        clock.now = step / 500
        for i, stream in enumerate(streams):
            piece = f"{i}:{step} "
            texts[i].append(piece)
            ready = stream.add(piece, 1, True)
            if ready:
                posts_after_first += step > 1
                sent[i] += ready
    # 512 streams at 500 POSTs/s: each flushes at most every 1.024 s, whatever its token rate.
    assert policy.min_interval_s() == 512 / 500
    assert posts_after_first <= 500 * 2
    assert posts_after_first == 512  # each stream once more, at 1.024 s
    for i, stream in enumerate(streams):
        sent[i] += stream.drain()
        assert sent[i] == texts[i]  # every piece, in order, none twice
        stream.close()
    assert policy.streams == 0


def test_chunks_grow_back_as_streams_end():
    clock = Clock()
    policy = FlushPolicy(batch_tokens=16, batch_ms=100, posts_per_s=10, clock=clock)
    streams = [policy.stream() for _ in range(5)]
    for stream in streams:
        stream.add("a", 1, True)
    clock.now = 0.2
    assert streams[0].add("b", 16, True) is None  # 5 streams at 10 POSTs/s: 0.5 s apart
    for stream in streams[1:]:
        stream.close()
    assert streams[0].add("c", 1, True) == ["b", "c"]  # alone now: 0.1 s apart
    streams[0].close()
    streams[0].close()  # twice is harmless
    assert policy.streams == 0


def test_a_stream_counts_from_its_first_chunk_only():
    # Jobs that wait in the engine's queue send nothing: they must not slow the streams that flow.
    policy = FlushPolicy(batch_tokens=1, batch_ms=0, posts_per_s=1, clock=Clock())
    waiting = [policy.stream() for _ in range(100)]
    flowing = policy.stream()
    assert flowing.add("a", 1, True) == ["a"]
    assert policy.streams == 1
    for stream in waiting:
        stream.close()
    assert policy.streams == 1
