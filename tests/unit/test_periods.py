"""Relative periods a query names (services/ltm/periods.py), grounded on the time of the question."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.ltm.periods import in_period, query_periods

NOW = datetime(2023, 5, 10, 15, 0, tzinfo=UTC).timestamp()  # a Wednesday


def at(day: int, hour: int = 12, month: int = 5) -> float:
    return datetime(2023, month, day, hour, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("query", "period", "inside", "outside"), [
    # a weekend: its Saturday and Sunday (Friday to Monday with the +-2 days), not the Tuesday after it
    ("What did I do last weekend?", (2023, 5, 7), [at(6, 0), at(6, 10), at(7, 23)], [at(9, 12), at(4, 12)]),
    ("Any plans for this weekend?", (2023, 5, 14), [at(13, 0), at(14, 23)], [at(11, 12), at(16, 12)]),
    ("Will it rain next weekend?", (2023, 5, 21), [at(20, 9), at(21, 21)], [at(18, 12), at(23, 12)]),
    # "a week ago" names a day: Wednesday 3 May, not the Saturday after it
    ("Where was I a week ago?", (2023, 5, 3), [at(3, 9), at(1, 12), at(5, 0)], [at(6, 12)]),
    ("What did we cook two weeks ago?", (2023, 4, 26), [at(26, 20, 4)], [at(29, 12, 4)]),
    ("What will I do in 2 weeks?", (2023, 5, 24), [at(24, 8)], [at(27, 12)]),
    # a whole week: its middle (Thursday), Tuesday to Friday
    ("What happened last week?", (2023, 5, 4), [at(2, 1), at(4, 12), at(5, 23)], [at(7, 12)]),
    ("Who did I meet this week?", (2023, 5, 11), [at(9, 1), at(12, 23)], [at(14, 12)]),
])
def test_relative_weeks_and_weekends_centre_on_the_days_they_name(query: str, period: tuple[int, int, int],
                                                                   inside: list[float], outside: list[float]) -> None:
    assert query_periods(query, NOW) == [period]
    assert all(in_period(t, [period]) for t in inside), query
    assert not any(in_period(t, [period]) for t in outside), query
