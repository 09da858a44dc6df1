"""Relative dates ("yesterday", "last week", "two days ago", "next Friday") grounded on a message's timestamp."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
           "nine": 9, "ten": 10, "a couple of": 2, "a few": 3, "couple of": 2, "few": 3}
_NUM = r"(\d+|a couple of|couple of|a few|few|an|a|one|two|three|four|five|six|seven|eight|nine|ten)"
_FUTURE_CUE = re.compile(r"\b(?:will|'ll|shall|going to|gonna|plan(?:ning)? to|due|starts?|leaves?|leaving)\b", re.I)
_NO_ON = {"by", "until", "till", "since", "before", "after", "from", "on", "of"}


@dataclass(slots=True, frozen=True)
class DateRef:
    start: int
    end: int
    phrase: str
    text: str  # how it reads in a memory: "on 7 May 2023", "the week before 8 May 2023", "in 2022"
    iso: str   # the date (or month, or year) it names: "2023-05-07", "2023-04", "2022"


def day_text(d: dt.date) -> str:
    return f"{d.day} {MONTHS[d.month - 1]} {d.year}"


def _month_shift(d: dt.date, months: int) -> dt.date:
    m = d.month - 1 + months
    return dt.date(d.year + m // 12, m % 12 + 1, 1)


def _span(d: dt.date, unit: str, direction: int, anchor: dt.date) -> tuple[str, str]:
    """Text and iso of a week/weekend/month/year ``direction`` units from ``anchor`` (0 = this one)."""
    if unit == "week":
        if direction == 0:
            return f"the week of {day_text(anchor)}", (anchor - dt.timedelta(days=anchor.weekday())).isoformat()
        rel = "before" if direction < 0 else "after"
        start = anchor - dt.timedelta(days=anchor.weekday()) + dt.timedelta(weeks=direction)
        return f"the week {rel} {day_text(anchor)}", start.isoformat()
    if unit == "weekend":
        saturday = anchor + dt.timedelta(days=(5 - anchor.weekday()) % 7) + dt.timedelta(weeks=direction)
        if direction < 0 and anchor.weekday() >= 5:
            saturday = anchor - dt.timedelta(days=anchor.weekday() - 5) - dt.timedelta(weeks=1)
        rel = {-1: "before", 0: "of", 1: "after"}[max(-1, min(1, direction))]
        return f"the weekend {rel} {day_text(anchor)}", saturday.isoformat()
    if unit == "month":
        m = _month_shift(anchor, direction)
        return f"in {MONTHS[m.month - 1]} {m.year}", f"{m.year:04d}-{m.month:02d}"
    year = anchor.year + direction
    return f"in {year}", f"{year:04d}"


_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(?:the )?day before yesterday\b", re.I), "d-2"),
    (re.compile(r"\b(?:the )?day after tomorrow\b", re.I), "d+2"),
    (re.compile(r"\byesterday\b|\blast night\b", re.I), "d-1"),
    (re.compile(r"\btoday\b|\btonight\b|\bthis (?:morning|afternoon|evening)\b", re.I), "d+0"),
    (re.compile(r"\btomorrow\b", re.I), "d+1"),
    (re.compile(rf"\b{_NUM} (day|week|month|year)s? ago\b", re.I), "ago"),
    (re.compile(rf"\bin {_NUM} (day|week|month|year)s?\b", re.I), "in"),
    (re.compile(r"\b(last|this|next) (week|weekend|month|year)\b", re.I), "unit"),
    (re.compile(rf"\b(last|this|next) ({'|'.join(WEEKDAYS)})\b", re.I), "weekday"),
]


def ground_dates(text: str, timestamp: float) -> list[DateRef]:
    """Relative date expressions in ``text``, resolved against the message's (UTC) date."""
    anchor = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC).date()
    found: list[DateRef] = []
    taken: list[tuple[int, int]] = []
    for pattern, kind in _PATTERNS:
        for m in pattern.finditer(text):
            if any(s < m.end() and m.start() < e for s, e in taken):
                continue
            if kind == "in" and not _FUTURE_CUE.search(text):
                continue
            try:
                resolved = _resolve(kind, m, anchor)
            except (ValueError, OverflowError):  # "10000 years ago": no calendar date
                resolved = None
            if resolved is None:
                continue
            words, iso = resolved
            found.append(DateRef(m.start(), m.end(), m.group(0), words, iso))
            taken.append((m.start(), m.end()))
    return sorted(found, key=lambda r: r.start)


def _resolve(kind: str, m: re.Match[str], anchor: dt.date) -> tuple[str, str] | None:
    if kind.startswith("d"):
        d = anchor + dt.timedelta(days=int(kind[1:]))
        return f"on {day_text(d)}", d.isoformat()
    if kind in ("ago", "in"):
        n, unit = NUMBERS.get(m.group(1).lower()) or int(m.group(1)), m.group(2).lower()
        if n > 200:  # not a date anyone means
            return None
        sign = -1 if kind == "ago" else 1
        if unit in ("day", "week"):
            d = anchor + dt.timedelta(days=sign * n * (7 if unit == "week" else 1))
            return f"on {day_text(d)}" if unit == "day" else f"the week of {day_text(d)}", d.isoformat()
        return _span(anchor, unit, sign * n, anchor)
    if kind == "unit":
        direction = {"last": -1, "this": 0, "next": 1}[m.group(1).lower()]
        return _span(anchor, m.group(2).lower(), direction, anchor)
    which, day = m.group(1).lower(), WEEKDAYS.index(m.group(2).lower())
    if which == "last":
        delta = -((anchor.weekday() - day) % 7 or 7)
    elif which == "next":
        delta = (day - anchor.weekday()) % 7 or 7
    else:
        delta = day - anchor.weekday()
    d = anchor + dt.timedelta(days=delta)
    return f"on {WEEKDAYS[day].capitalize()}, {day_text(d)}", d.isoformat()


def apply_dates(text: str, refs: Sequence[DateRef]) -> str:
    """``text`` with each relative date replaced by its grounded form."""
    out, pos = [], 0
    for r in refs:
        words = r.text
        before = text[:r.start].rstrip().rsplit(" ", 1)[-1].lower() if text[:r.start].strip() else ""
        if before in _NO_ON and words.startswith("on "):
            words = words[3:]
        out.append(text[pos:r.start])
        out.append(words)
        pos = r.end
    out.append(text[pos:])
    return "".join(out)
