"""Periods a query names ("on 9 November, 2022", "in May 2022", "in August", "last month"), and whether a memory's
time falls in one: retrieval's time term (services/ltm/retrieval.py, step 2)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

DAY = 86_400.0


_MONTHS = {m: i for i, name in enumerate(
    ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
     "november", "december"), start=1) for m in (name, name[:3], "sept" if i == 9 else name[:3])}
_MONTH = r"(?P<month>" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_DAY = r"(?P<day>[0-3]?\d)(?:st|nd|rd|th)?"
_YEAR = r"(?P<year>(?:19|20)\d\d)"
_DATES = [re.compile(rf"\b{p}\b", re.IGNORECASE) for p in (
    rf"{_MONTH}\s+{_DAY},?\s+{_YEAR}",  # October 13, 2023
    rf"{_DAY}\s+(?:of\s+)?{_MONTH},?\s+{_YEAR}",  # 8th December, 2023
    rf"{_MONTH},?\s+{_YEAR}",  # May 2022
    rf"(?:in|during|since|by|of)\s+{_MONTH}",  # in August (any year)
    rf"(?:in|during|since|by|of)\s+{_YEAR}",  # in 2022
)]


Period = tuple[int | None, int | None, int | None]


def _iso_period(iso: str) -> Period | None:
    parts = [int(x) for x in iso.split("-") if x.isdigit()]
    if not parts:
        return None
    return (parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else None)


_WHOLE_WEEK = re.compile(r"\b(?:last|this|next)\s+week\b", re.IGNORECASE)


def _week_centre(phrase: str) -> int:
    """Days from the date a week phrase is grounded on (services/ltm/extraction/dates.py) to the day that stands
    for it, +-2 days: "last/this/next week" name the week's Monday (its middle: Thursday, covering Tuesday to
    Friday), "last/this/next weekend" its Saturday (the middle of Saturday and Sunday: Sunday's midnight, covering
    Friday to Monday), "a week ago" and "in two weeks" the day itself."""
    if "weekend" in phrase.lower():
        return 1
    if _WHOLE_WEEK.search(phrase):
        return 3
    return 0


def query_periods(query: str, now: float | None = None) -> list[Period]:
    """Dates the query names, as (year, month, day) with None for the parts it leaves open.

    With ``now``, relative phrases ("last month", "two weeks ago", "yesterday") are resolved against it
    (the same rules that ground dates at ingest, services/ltm/extraction.py); a named week or weekend counts as
    its middle day, "a week ago" as that day, +-2 days (:func:`_week_centre`).
    """
    found: list[Period] = []
    taken: list[tuple[int, int]] = []
    if now is not None:
        from services.ltm.extraction import ground_dates

        for ref in ground_dates(query, now):
            period = _iso_period(ref.iso)
            if period is None:
                continue
            if "week" in ref.text and period[2] is not None:
                mid = datetime(period[0] or 1970, period[1] or 1, period[2], tzinfo=UTC).timestamp() \
                    + _week_centre(ref.phrase) * DAY
                when = datetime.fromtimestamp(mid, UTC)
                period = (when.year, when.month, when.day)
            found.append(period)
            taken.append((ref.start, ref.end))
    for pattern in _DATES:
        for m in pattern.finditer(query):
            if any(a < m.end() and m.start() < b for a, b in taken):
                continue
            parts = m.groupdict()
            day = int(parts["day"]) if parts.get("day") else None
            if day is not None and not 1 <= day <= 31:
                continue
            month = _MONTHS[parts["month"].lower()] if parts.get("month") else None
            found.append((int(parts["year"]) if parts.get("year") else None, month, day))
            taken.append(m.span())
    return found


def in_period(ts: float | None, periods: Sequence[tuple[int | None, int | None, int | None]]) -> bool:
    """Whether a memory's time (UTC) falls in a named period; a named day allows two days either side."""
    if ts is None:
        return False
    when = datetime.fromtimestamp(ts, UTC)
    for year, month, day in periods:
        if day is not None and year is not None and month is not None:
            try:
                named = datetime(year, month, day, tzinfo=UTC)
            except ValueError:
                continue
            if abs((when - named).total_seconds()) <= 2 * DAY:
                return True
        elif (year is None or when.year == year) and (month is None or when.month == month):
            return True
    return False


def in_periods(ts: np.ndarray, periods: Sequence[Period]) -> np.ndarray:
    """:func:`in_period` of every time in ``ts`` at once (NaN: no time), as a bool array: a search tests up to 1,000
    candidates, and a ``datetime`` each was a tenth of its event loop time when the query named a period."""
    out = np.zeros(len(ts), dtype=bool)
    known = ~np.isnan(ts)
    if not periods or not known.any():
        return out
    t = ts[known]
    seconds = np.floor(t).astype(np.int64).astype("datetime64[s]")
    years = seconds.astype("datetime64[Y]").astype(np.int64) + 1970
    months = seconds.astype("datetime64[M]").astype(np.int64) % 12 + 1
    hit = np.zeros(len(t), dtype=bool)
    for year, month, day in periods:
        if day is not None and year is not None and month is not None:
            try:
                named = datetime(year, month, day, tzinfo=UTC).timestamp()
            except ValueError:
                continue
            hit |= np.abs(t - named) <= 2 * DAY
        else:
            same = np.ones(len(t), dtype=bool)
            if year is not None:
                same &= years == year
            if month is not None:
                same &= months == month
            hit |= same
    out[known] = hit
    return out
