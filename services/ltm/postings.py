"""The postings of one user's memories in the search index (services/ltm/search_index.py): for each lexeme, the
rows that hold it and its count in each, for BM25.

Held so that the garbage collector walks none of it. A full collection walks every tracked object while the event
loop stands still, and a tuple of two ``array.array`` per lexeme (the first layout) was three tracked objects per
lexeme of every indexed user: with 50k memories warmed, full collections of 35-100 ms. Here a user's postings are
a dict of lexeme -> number (strings and ints: not tracked) and three flat arrays, whatever the number of lexemes:

- merged postings, sorted by lexeme number (CSR: ``_start[k]:_start[k + 1]`` is lexeme k's slice of ``_rows`` and
  ``_tfs``);
- the tail: (lexeme, row, count) of the rows added since the last merge, appended to growable arrays, read by a scan
  (a search's catch-up adds a few rows at a time); merged once it holds more than an eighth of the merged postings
  (and at least ``MIN_TAIL``), so each posting is copied a bounded number of times, and always after a load.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import numpy as np

MIN_TAIL = 4096  # postings the tail may hold before a merge, whatever the size of the merged part


class Postings:
    __slots__ = ("_ids", "_rows", "_start", "_tail_lex", "_tail_rows", "_tail_tfs", "_tfs")

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}  # lexeme -> its number
        self._start = np.zeros(1, np.int64)
        self._rows = np.zeros(0, np.int32)
        self._tfs = np.zeros(0, np.int32)
        self._tail_lex, self._tail_rows, self._tail_tfs = array("i"), array("i"), array("i")

    def __len__(self) -> int:
        """Postings held (merged and tail)."""
        return len(self._rows) + len(self._tail_rows)

    def add(self, row: int, lexemes: Sequence[str], counts: Sequence[int]) -> None:
        """Row ``row`` holds ``lexemes`` (each ``counts[i]`` times); into the tail."""
        self.add_rows(row, [lexemes], [counts])

    def add_rows(self, first: int, lexemes: Sequence[Sequence[str]], counts: Sequence[Sequence[int]]) -> None:
        """Rows ``first``, ``first + 1``, ... hold ``lexemes[j]`` (each ``counts[j][i]`` times): :meth:`add` for a
        chunk of rows at once (a load's), without a Python step per posting but the lexeme's lookup."""
        ids = self._ids
        flat = [lexeme for row in lexemes for lexeme in row]
        if not flat:
            return
        ks = [ids.setdefault(lexeme, len(ids)) for lexeme in flat]  # a new lexeme gets the next number
        sizes = np.fromiter((len(row) for row in lexemes), np.int64, len(lexemes))
        tfs = [tf for row in counts for tf in row]
        if len(tfs) != len(ks):
            raise ValueError("lexemes and counts differ in length")
        self._tail_lex.extend(ks)
        self._tail_rows.frombytes(np.repeat(np.arange(first, first + len(lexemes), dtype=np.int32), sizes).tobytes())
        self._tail_tfs.extend(tfs)

    def get(self, lexeme: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, counts as int32) of ``lexeme``, None when no row holds it. Read only: views of the arrays."""
        k = self._ids.get(lexeme)
        if k is None:
            return None
        rows: np.ndarray | None = None
        tfs: np.ndarray | None = None
        if k + 1 < len(self._start):
            a, b = int(self._start[k]), int(self._start[k + 1])
            rows, tfs = self._rows[a:b], self._tfs[a:b]
        if self._tail_lex:
            at = np.flatnonzero(np.frombuffer(self._tail_lex, dtype=np.int32) == k)
            if len(at):
                more_rows = np.frombuffer(self._tail_rows, dtype=np.int32)[at]
                more_tfs = np.frombuffer(self._tail_tfs, dtype=np.int32)[at]
                if rows is None or tfs is None:
                    rows, tfs = more_rows, more_tfs
                else:
                    rows, tfs = np.concatenate([rows, more_rows]), np.concatenate([tfs, more_tfs])
        if rows is None or tfs is None or not len(rows):
            return None
        return rows, tfs

    def settle(self, *, force: bool = False) -> None:
        """Merge the tail when it has grown past its share (the module docstring), or whenever there is one with
        ``force`` (after a load)."""
        tail = len(self._tail_lex)
        if not tail or not (force or (tail >= MIN_TAIL and tail * 8 >= len(self._rows))):
            return
        n_lex = len(self._ids)
        merged_lex = np.repeat(np.arange(len(self._start) - 1, dtype=np.int32), np.diff(self._start))
        lex = np.concatenate([merged_lex, np.frombuffer(self._tail_lex, dtype=np.int32)])
        rows = np.concatenate([self._rows, np.frombuffer(self._tail_rows, dtype=np.int32)])
        tfs = np.concatenate([self._tfs, np.frombuffer(self._tail_tfs, dtype=np.int32)])
        order = np.argsort(lex, kind="stable")  # each lexeme's rows stay in the order they were added
        self._rows, self._tfs = rows[order], tfs[order]
        self._start = np.zeros(n_lex + 1, np.int64)
        np.cumsum(np.bincount(lex, minlength=n_lex), out=self._start[1:])
        self._tail_lex, self._tail_rows, self._tail_tfs = array("i"), array("i"), array("i")

    def keep(self, alive: np.ndarray) -> None:
        """Only the postings of the rows ``alive`` holds, the rows numbered again in order (row i becomes the
        number of rows alive before it): what a held user's rows are once its deleted ones are dropped."""
        self.settle(force=True)
        n_lex = len(self._start) - 1
        lex = np.repeat(np.arange(n_lex, dtype=np.int32), np.diff(self._start))
        held = alive[self._rows]
        renumber = np.cumsum(alive, dtype=np.int64) - 1
        self._rows = renumber[self._rows[held]].astype(np.int32)
        self._tfs = self._tfs[held]
        start = np.zeros(n_lex + 1, np.int64)
        np.cumsum(np.bincount(lex[held], minlength=n_lex), out=start[1:])
        self._start = start
