"""The search index's postings (services/ltm/postings.py) against a plain dict of lists, through merges."""

from __future__ import annotations

import gc
import random

import numpy as np

from services.ltm import postings
from services.ltm.postings import Postings


def as_lists(p: Postings, lexeme: str) -> list[tuple[int, int]] | None:
    got = p.get(lexeme)
    return None if got is None else list(zip(got[0].tolist(), got[1].tolist(), strict=True))


def test_postings_match_a_dict_of_lists_before_and_after_every_merge() -> None:
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(300)]
    p, plain = Postings(), {}
    row = 0
    for step in range(40):  # a load (forced merge), then catch-ups of a few rows, merged when the tail is large
        chunk: list[tuple[list[str], list[int]]] = []
        for _ in range(rng.choice([1, 3, 50])):
            lexemes = rng.sample(vocab, rng.randint(0, 12))
            chunk.append((lexemes, [rng.randint(1, 4) for _ in lexemes]))
        if step % 2:  # a row at a time (a catch-up) or the chunk at once (a load)
            for j, (lexemes, counts) in enumerate(chunk):
                p.add(row + j, lexemes, counts)
        else:
            p.add_rows(row, [lx for lx, _ in chunk], [tf for _, tf in chunk])
        for lexemes, counts in chunk:
            for lexeme, tf in zip(lexemes, counts, strict=True):
                plain.setdefault(lexeme, []).append((row, tf))
            row += 1
        p.settle(force=step == 0)
        for lexeme in [*rng.sample(vocab, 20), "never"]:
            assert as_lists(p, lexeme) == plain.get(lexeme), (step, lexeme)
    assert len(p) == sum(map(len, plain.values()))


def test_a_catch_up_merges_only_once_the_tail_has_grown(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(postings, "MIN_TAIL", 10)
    p = Postings()
    for row in range(100):
        p.add(row, ["a", "b"], [1, 2])
    p.settle(force=True)
    assert len(p._tail_lex) == 0 and len(p._rows) == 200
    p.add(100, ["a", "c"], [1, 1])
    p.settle()  # 2 in the tail: well under an eighth of 200, and under MIN_TAIL
    assert len(p._tail_lex) == 2 and as_lists(p, "c") == [(100, 1)] and as_lists(p, "a")[-1] == (100, 1)
    for row in range(101, 115):
        p.add(row, ["c", "d"], [1, 1])
    p.settle()  # 30 >= 200 / 8 and >= MIN_TAIL: merged
    assert len(p._tail_lex) == 0 and [r for r, _ in as_lists(p, "c")] == [100, *range(101, 115)]
    assert np.array_equal(p.get("b")[0], np.arange(100, dtype=np.int32))


def test_no_object_per_lexeme_for_the_garbage_collector() -> None:
    p = Postings()
    for row in range(2000):
        p.add(row, [f"w{row % 997}", f"x{row}"], [1, 1])
    p.settle(force=True)
    gc.collect()
    assert not gc.is_tracked(p._ids) and not any(map(gc.is_tracked, (p._start, p._rows, p._tfs)))
    assert len(p._ids) == 997 + 2000  # one number per lexeme, and no object
