"""What keeps two alike statements apart in consolidation (services/ltm/lifecycle.py particulars)."""

from __future__ import annotations

import pytest

from services.ltm.lifecycle import particulars

DAY = 86_400.0
T = 1_700_000_000.0


@pytest.mark.parametrize(("a", "b"), [
    ("Call mom on 8 May.", "Call mom on 15 May."),
    ("The dentist is on Tuesday.", "The dentist is on Thursday."),
    ("The flight leaves at 9am.", "The flight leaves at 6pm."),
    ("I owe Sam $20.", "I owe Sam $200."),
    ("We have two cats.", "We have three cats."),
    ("Send the report by March 3.", "Send the report by April 3."),
])
def test_other_numbers_dates_days_or_times_are_apart(a: str, b: str) -> None:
    assert particulars(a, T) != particulars(b, T)


@pytest.mark.parametrize(("a", "b"), [
    ("I love hiking in the mountains.", "I love hiking in mountains."),
    ("Meet at 4pm.", "Meet at 4 p.m."),
    ("Due on Sept 3.", "Due on September 3."),
    ("Alice may move to Oslo.", "Alice might move to Oslo."),  # "may" the verb is no date
    ("I am a nurse.", "I'm a nurse."),  # "am" the verb is no time
    ("For my last birthday I got a kite.", "For my last birthday I got a red kite."),
])
def test_the_same_particulars_or_none_do_not_keep_them_apart(a: str, b: str) -> None:
    assert particulars(a, T) == particulars(b, T)


def test_a_relative_day_is_the_day_it_was_said() -> None:
    said = "I have to call the bank tomorrow."
    assert particulars(said, T) == particulars(said, T + 60)
    assert particulars(said, T) != particulars(said, T + DAY)
    assert particulars("We meet next Friday.", T) != particulars("We meet next Friday.", T + 7 * DAY)
    assert particulars("I call the bank every day.", T) == particulars("I call the bank every day.", T + DAY)
