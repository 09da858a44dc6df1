"""chat_ai's limit on turns waiting for ltm at once: AIMD on the round trips of memory searches."""

from __future__ import annotations

from services.chat_ai.recall_limit import RecallLimit


def test_it_grows_only_while_it_binds() -> None:
    limit = RecallLimit(16, 0.5)
    assert limit.limit == 4  # the initial value
    for i in range(100):  # a quiet mesh: one turn at a time, every reply fast, nothing learnt about bursts
        limit.record(0.02, waiting=1, now=i * 0.01)
    assert limit.limit == 4 and limit.cuts == 0
    replies = 0
    while limit.limit < 16:  # a burst: as many waiting as allowed, replies fast: about one more per limit's worth
        limit.record(0.02, waiting=limit.limit, now=2.0)
        replies += 1
    assert sum(range(4, 16)) - 4 <= replies <= sum(range(5, 17))
    for _ in range(50):
        limit.record(0.02, waiting=16, now=3.0)
    assert limit.limit == 16  # the ceiling: CHAT_RECALL_CONCURRENCY


def test_slow_replies_cut_once_per_window_and_a_timeout_halves() -> None:
    limit = RecallLimit(16, 0.5, initial=16)  # slow: > 250 ms; a cut at most once per 250 ms
    limit.record(0.3, waiting=16, now=10.0)
    assert limit.limit == 11  # 16 x 0.7
    for t in (10.01, 10.1, 10.2):  # the requests that were already waiting: as slow, no news
        limit.record(0.3, waiting=11, now=t)
    limit.record(None, waiting=11, now=10.24)  # a timeout within the same window
    assert limit.limit == 11 and limit.cuts == 1
    limit.record(None, waiting=11, now=10.3)  # the next window: a timeout halves it
    assert limit.limit == 5 and limit.cuts == 2
    for _ in range(3):  # between fast and slow: hold
        limit.record(0.2, waiting=5, now=11.0)
    assert limit.limit == 5


def test_the_limit_never_falls_below_one() -> None:
    limit = RecallLimit(4, 0.5)
    for i in range(50):
        limit.record(None, waiting=4, now=float(i))
    assert limit.limit == 1
    limit.record(0.01, waiting=1, now=100.0)
    assert limit.limit == 2  # 1 + 1/1
