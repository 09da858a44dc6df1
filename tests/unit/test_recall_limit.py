"""chat_ai's limit on turns waiting for ltm at once: AIMD on the round trips of memory searches."""

from __future__ import annotations

from services.chat_ai.recall_limit import RecallLimit


def test_quiet_mesh_keeps_the_ceiling() -> None:
    limit = RecallLimit(16, 0.5)
    for i in range(100):
        limit.record(0.02, now=i * 0.01)
    assert limit.limit == 16 and limit.cuts == 0


def test_slow_replies_cut_once_per_window_and_fast_ones_win_it_back() -> None:
    limit = RecallLimit(16, 0.5)  # slow: > 250 ms; a cut at most once per 250 ms
    limit.record(0.3, now=10.0)
    assert limit.limit == 11  # 16 x 0.7
    for t in (10.01, 10.1, 10.2):  # the requests that were already waiting: as slow, no news
        limit.record(0.3, now=t)
    limit.record(None, now=10.24)  # a timeout within the same window
    assert limit.limit == 11 and limit.cuts == 1
    limit.record(None, now=10.3)  # the next window: a timeout halves it
    assert limit.limit == 5 and limit.cuts == 2
    for _ in range(3):  # between fast and slow: hold
        limit.record(0.2, now=11.0)
    assert limit.limit == 5
    replies = 0
    while limit.limit < 16:  # fast replies add about one per limit's worth
        limit.record(0.05, now=12.0)
        replies += 1
    assert sum(range(5, 16)) - 5 <= replies <= sum(range(6, 17))


def test_the_limit_never_falls_below_one() -> None:
    limit = RecallLimit(4, 0.5)
    for i in range(50):
        limit.record(None, now=float(i))
    assert limit.limit == 1
    limit.record(0.01, now=100.0)
    assert limit.limit == 2  # 1 + 1/1
