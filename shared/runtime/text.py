"""Small text rules that more than one service applies, so that they agree."""

from __future__ import annotations

import re

_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")


def is_question(text: str) -> bool:
    """A turn that only asks (every sentence ends with '?'): it tells nothing about the user.

    ltm flags such turns at ingest (``meta.question``, ranked lower); chat_ai's offline responder never quotes them.
    """
    sentences = [s.strip() for s in _SENTENCE.findall(text) if s.strip()]
    return bool(sentences) and all(s.endswith("?") for s in sentences)
