"""mesh eval stm's replay: evidence turns that left the window, and those the summary kept."""

from __future__ import annotations

from mesh.eval_stm import replay
from services.memory.summary import ExtractiveSummariser
from services.memory.tokens import default_counter


def test_replay_counts_what_left_the_window_and_what_the_summary_kept() -> None:
    texts = ["My sister Ana lives in Porto and teaches piano.", "ok", "thanks",
             "I bought a blue bicycle in 2021 for commuting.", "sure", "bye"]
    labels = [1, 1, 0, 1, 0, 0]
    wide = replay(texts, [False] * 6, labels, None, ExtractiveSummariser(default_counter(), 500), window=2)
    assert wide["folds"] == 4 and wide["left"] == 3  # turns 0-3 left a window of 2; three of them evidence
    assert wide["kept"] == 2  # "ok" says nothing and is never kept; both facts are
    # during: after each fold, the evidence turns gone so far (1, 2, 2, 3) and kept (1, 1, 1, 2)
    assert (wide["during_left"], wide["during_kept"]) == (8, 5)
    tight = replay(texts, [False] * 6, labels, None, ExtractiveSummariser(default_counter(), 50), window=2)
    assert tight["kept"] == 1  # room for one of the two facts
    # the model's scores decide which: only turn 3 is evidence here
    only_last = [0, 0, 0, 1, 0, 0]
    for scores, kept in (([1.0, 0, 0, 0.0, 0, 0], 0), ([0.0, 0, 0, 1.0, 0, 0], 1)):
        r = replay(texts, [False] * 6, only_last, scores, ExtractiveSummariser(default_counter(), 50,
                                                                               salience_weight=50), window=2)
        assert r["left"] == 1 and r["kept"] == kept, (scores, r)
