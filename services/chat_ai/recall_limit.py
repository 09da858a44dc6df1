"""How many of a chat_ai process's turns may wait for ltm at once, adapted to how fast ltm answers.

A turn's LTM_TIMEOUT_MS starts when it asks ltm. A turn held back before asking loses nothing (its wait in
``user_input_queue`` is not counted against memory), a turn that asks and waits too long is answered without
memory. So the number of turns asking at once should be as many as ltm answers well within the timeout, and no
more: ltm serves its list one request after another, so every extra request waiting there only adds to the wait of
those behind it. A fixed CHAT_RECALL_CONCURRENCY cannot know that number: it depends on ltm's speed, how many ltm
and chat_ai processes share the machine, and what else runs (a sustained 50-session burst on 2 cores lost memory
on a third of its turns with 16).

:class:`RecallLimit` finds it as TCP finds its window and Netflix's concurrency-limits their limit (AIMD): each
reply that came back well within the timeout (under ``fast`` of it) raises the limit by 1/limit, about one a round;
a reply that took more than ``slow`` of the timeout cuts it by ``cut``, and no reply in time (a turn without memory:
TCP's loss) by ``lost``, at most once per ``slow`` x timeout, since the requests already waiting when the first slow
reply came back are as slow and say nothing new. The limit stays between 1 and CHAT_RECALL_CONCURRENCY.

It starts at ``initial`` (4, or the ceiling if lower) and grows only while it binds, i.e. while as many turns as it
allows are waiting (TCP's window validation, RFC 7661): a quiet mesh's fast replies say nothing about how many at
once ltm answers in time, and a limit grown on them met the next burst with 16 searches at once (one of a
1,000-turn burst's first turns timed out that way on 2 cores).
"""

from __future__ import annotations

import time


class RecallLimit:
    def __init__(self, ceiling: int, timeout_s: float, *, initial: int = 4, fast: float = 0.3, slow: float = 0.5,
                 cut: float = 0.7, lost: float = 0.5) -> None:
        self.ceiling, self.timeout_s = ceiling, timeout_s
        self.fast_s, self.slow_s, self.cut, self.lost = fast * timeout_s, slow * timeout_s, cut, lost
        self._value = float(min(initial, ceiling))
        self._cut_at = float("-inf")  # time.monotonic() of the last cut
        self.cuts = 0

    @property
    def limit(self) -> int:
        return max(1, int(self._value))

    def record(self, seconds: float | None, waiting: int, now: float | None = None) -> None:
        """One memory search's round trip (None: no reply in time); ``waiting``: the turns waiting for ltm when it
        ended, itself included."""
        now = time.monotonic() if now is None else now
        if seconds is None or seconds > self.slow_s:
            if now - self._cut_at >= self.slow_s:
                self._value = max(1.0, self._value * (self.lost if seconds is None else self.cut))
                self._cut_at = now
                self.cuts += 1
        elif seconds < self.fast_s and waiting >= self.limit:
            self._value = min(float(self.ceiling), self._value + 1.0 / self._value)
