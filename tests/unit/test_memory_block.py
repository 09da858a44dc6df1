"""The prompt's memory block: bounded, labelled, deduplicated, best first; and what the offline responder quotes."""

from __future__ import annotations

import random

import pytest

from services.chat_ai.prompt import (
    CUT,
    DOCS_HEADER,
    MEMORY_HEADER,
    Cutter,
    contains_turn,
    count_tokens,
    memory_block,
    prompt_block,
)
from services.chat_ai.responder import offline_reply, pick_quotes
from shared.contracts import Memory, MemorySource
from shared.contracts.messages import ContextTurn, DocPassage
from shared.runtime.stm import Stm
from shared.runtime.text import is_question
from shared.runtime.tokens import wordpiece

T0 = 1_684_000_000.0  # 2023-05-13


def mem(mid: str, content: str, score: float, *, speaker: str = "user", type_: str = "episodic",
        ts: float = T0, context: list[ContextTurn] | None = None, message_id: str | None = None) -> Memory:
    return Memory(memory_id=mid, type=type_, content=content, score=score, created_at=ts,  # type: ignore[arg-type]
                  source=MemorySource(message_id=message_id or f"msg-{mid}", session_id="s", timestamp=ts,
                                      speaker=speaker),
                  context=context or [])


def ctx(mid: str, content: str, ts: float, speaker: str = "ai") -> ContextTurn:
    return ContextTurn(message_id=mid, content=content, timestamp=ts, speaker=speaker)


def test_block_is_labelled_best_first_and_in_time_order_within_an_entry() -> None:
    block = memory_block([
        mem("a", "My sister Ottilie lives in Lisbon.", 2.0, ts=T0 + 60,
            context=[ctx("c1", "Tell me about your family.", T0), ctx("c2", "Lisbon is lovely.", T0 + 120)]),
        mem("b", "I love teal sailboats.", 1.0, ts=T0 + 86_400 * 3),
    ], max_tokens=1500, turn_tokens=400)
    lines = block.text.splitlines()
    assert lines[0] == MEMORY_HEADER
    assert lines[1] == "  2023-05-13 (Sat), assistant: Tell me about your family."
    assert lines[2] == "- 2023-05-13 (Sat), user: My sister Ottilie lives in Lisbon."
    assert lines[3] == "  2023-05-13 (Sat), assistant: Lisbon is lovely."
    assert lines[4] == "- 2023-05-16 (Tue), user: I love teal sailboats."
    assert block.tokens == count_tokens(block.text)
    assert [e.turns[0].content for e in block.entries] == ["Tell me about your family.", "I love teal sailboats."]


def test_no_turn_twice_by_id_or_by_text() -> None:
    shared = ctx("c1", "We talked about boats.", T0)
    block = memory_block([
        mem("a", "I sail on Sundays.", 2.0, context=[shared]),
        mem("b", "I own a red boat.", 1.5, context=[shared]),  # the same context turn again
        mem("c", "i sail  on Sundays.", 1.0),  # the same words as a, another id
        mem("d", "I own a red boat.", 0.5, message_id="msg-b"),  # the same message as b
    ], max_tokens=1500, turn_tokens=400)
    body = block.text.splitlines()[1:]
    assert len(body) == 3 and len(set(body)) == 3
    assert sum("We talked about boats." in line for line in body) == 1


def test_budget_holds_for_the_whole_block_and_long_turns_are_cut() -> None:
    long_turn = " ".join(f"word{i}" for i in range(2000))
    memories = [mem(str(i), f"Fact {i}: I keep {i} tortoises. " + long_turn, 10.0 - i) for i in range(20)]
    for budget in (120, 300, 1500):
        block = memory_block(memories, max_tokens=budget, turn_tokens=100)
        assert 0 < block.tokens <= budget, (budget, block.tokens)
        assert all(t.cut for t in block.turns)
        assert all(line.endswith("…") for line in block.text.splitlines()[1:])
    assert memory_block([], 1500, 400).text == ""


def test_a_fact_extracted_from_a_turn_is_shown_as_the_turn() -> None:
    words = "By the way, my sister Ottilie moved to Lisbon last year."
    fact = mem("f", "User's sister Ottilie lives in Lisbon.", 3.0, type_="fact", message_id="m-1",
               context=[ctx("m-1", words, T0, speaker="user")])
    block = memory_block([fact], 1500, 400)
    assert contains_turn(block.text, words)
    assert "User's sister" not in block.text


def test_contains_turn_matches_whole_turns_and_cut_heads() -> None:
    long_turn = "I visited the aquarium with my niece. " * 40
    block = memory_block([mem("a", long_turn, 1.0)], 1500, turn_tokens=60)
    assert contains_turn(block.text, long_turn)  # its first 200 characters are there
    assert not contains_turn(block.text, "I never went to an aquarium.")
    assert not contains_turn("", long_turn)


def test_offline_responder_quotes_the_users_statements_never_questions_or_its_replies() -> None:
    block = memory_block([
        mem("q", "Where does my sister live?", 3.0),
        mem("r", "[offline responder: no language model is configured; I can only repeat what I remember]\n"
                 "- Ottilie lives in Lisbon", 2.5, speaker="ai"),
        mem("e", "Your sister lives in Lisbon, you said.", 2.2, speaker="ai"),
        mem("f", "My sister Ottilie lives in Lisbon and I love teal sailboats.", 2.0),
    ], 1500, 400)
    quotes = pick_quotes(block, "Where does my sister live?")
    assert [q.content for q in quotes] == ["My sister Ottilie lives in Lisbon and I love teal sailboats."]
    reply = offline_reply("Where does my sister live?", block, Stm())
    assert '"My sister Ottilie lives in Lisbon and I love teal sailboats."' in reply.text
    assert reply.model == "offline"


def test_questions_are_told_from_statements() -> None:
    assert is_question("Where does my sister live?")
    assert is_question("Hi! How are you? What's new?") is False  # "Hi!" is not a question
    assert not is_question("My dog is called Biscuit. What should I feed him?")
    assert not is_question("I live in Lisbon.")


def passage(pid: str, text: str, score: float, heading: list[str] | None = None, title: str = "Bees",
            source: str = "docs/bees.html") -> DocPassage:
    return DocPassage(doc_id=f"d-{title}", chunk_id=pid, chunk=0, source=source, title=title,
                      heading=heading or [], text=text, score=score)


def test_prompt_block_puts_memories_first_then_labelled_passages_under_one_budget() -> None:
    memories = [mem(str(i), f"I keep {i} tortoises in the garden and feed them dandelions every morning.", 5.0 - i)
                for i in range(40)]
    passages = [passage(f"p{i}", f"Passage {i}: the queen lays up to 2,000 eggs a day in summer. " * 4, 3.0 - i,
                        heading=["The colony", "The queen"]) for i in range(10)]
    for budget, reserve in ((1500, 500), (600, 200), (300, 150)):
        block = prompt_block(memories, passages, budget, 200, reserve)
        lines = block.text.splitlines()
        assert block.tokens == count_tokens(block.text) <= budget
        assert lines[0] == MEMORY_HEADER and DOCS_HEADER in lines
        docs_at = lines.index(DOCS_HEADER)
        assert all(not ln.startswith("- [doc:") for ln in lines[:docs_at])  # memories first, then passages
        label = "- [doc: Bees \u203a The colony \u203a The queen] Passage "
        assert all(ln.startswith(label) for ln in lines[docs_at + 1:])
        assert block.entries and block.passages and len(block.passages) == len(lines) - docs_at - 1
        # the passages get at least what was kept for them (the memories would have filled the whole budget)
        assert count_tokens("\n".join(lines[docs_at:])) >= reserve - 60
    # no passages: the memory block exactly as before; no memories: passages may take the whole budget
    assert prompt_block(memories, [], 600, 200, 500).text == memory_block(memories, 600, 200).text
    only = prompt_block([], passages, 600, 200, 100)
    assert only.text.startswith(DOCS_HEADER) and not only.entries and only.tokens <= 600
    assert len(only.passages) >= 3


def test_offline_responder_cites_the_passage_it_answers_from() -> None:
    bees = passage("p1", "The queen is the only fertile female. At the height of the season she can lay up to 2,000 "
                         "eggs a day. A queen may live three to five years.", 2.0, heading=["The colony", "The queen"],
                   title="The western honey bee")
    lights = passage("p2", "Robert Stevenson completed the Bell Rock Lighthouse in 1810.", 1.0, title="Lighthouses",
                     source="lighthouses.md")
    hiking = mem("h", "My favourite mountain for hiking is Ben Nevis.", 1.5)
    block = prompt_block([hiking], [bees, lights], 1500, 200, 500)
    reply = offline_reply("How many eggs does a queen lay in a day?", block, Stm())
    assert ('According to The western honey bee \u203a The colony \u203a The queen (docs/bees.html): "At the height '
            'of the season she can lay up to 2,000 eggs a day."') in reply.text
    assert "Ben Nevis" not in reply.text  # a memory sharing no word with the question is left out
    memory_reply = offline_reply("Which mountain do I like for hiking?", block, Stm())
    assert '"My favourite mountain for hiking is Ben Nevis."' in memory_reply.text
    assert "According to" not in memory_reply.text  # no passage shares a word with it
    assert offline_reply("How many eggs?", prompt_block([], [], 1500, 200), Stm()).text.endswith('"How many eggs?"')


def _reference_cut(text: str, tokens: int) -> tuple[str, int]:
    """The cut the slow way: the whole text tokenized, its head cut at a word boundary, the head tokenized again."""
    enc = wordpiece().encode(text, add_special_tokens=False)
    if len(enc.ids) <= tokens:
        return text, len(enc.ids)
    head = text[:enc.offsets[max(tokens - 1, 0)][1]]
    if len(head) < len(text) and not text[len(head)].isspace() and " " in head:
        head = head.rsplit(" ", 1)[0]
    body = head.rstrip() + CUT
    return body, count_tokens(body)


_PIECES = ["Caroline", "went", "to", "the", "LGBTQ", "support", "group", "yesterday,", "naïve", "café", "résumé",
           "hello,world!!!", "...", "日本語の", "テキスト", "😀", "\u200b", "a\x00b\x07c", "unbelievably" * 30,
           "x" * 700, "co-op's", "3.14159", "$1,200", "\t", "\n", "  ", "(see:",
           "https://example.com/a?b=c", "Œuvre", "ﬁne"]


def _texts(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        words = [rng.choice(_PIECES) for _ in range(rng.choice([1, 3, 12, 60, 400]))]
        out.append("".join(w + rng.choice([" ", " ", " ", "", "\n", "  "]) for w in words))
    return [t for t in out if t.strip()]


def test_cuts_and_counts_match_tokenizing_the_cut_text_again() -> None:
    """The block counts each turn from one tokenization (no token spans whitespace): the same cut and count as
    tokenizing every cut text again, for texts with accents, CJK, emoji, control characters and endless words."""
    rng = random.Random(7)
    cutter = Cutter()
    for text in _texts(rng, 400):
        limits = [1, 5, 24, 100, 200, 2000]
        rng.shuffle(limits)  # the block cuts to a line's size, then to the room left: a kept head serves both
        for tokens in limits:
            assert cutter.cut(text, tokens) == _reference_cut(text, tokens), (text[:80], tokens)


def test_the_block_count_is_the_count_of_its_text() -> None:
    rng = random.Random(11)
    texts = _texts(rng, 300)
    for trial in range(150):
        memories = [mem(f"{trial}-{i}", rng.choice(texts), 10.0 - i, type_=rng.choice(["episodic", "fact"]),
                        ts=T0 + rng.randint(0, 10**7), speaker=rng.choice(["user", "ai", "Caroline"]),
                        context=[ctx(f"c{trial}-{i}-{j}", rng.choice(texts), T0 + j) for j in range(rng.randint(0, 4))])
                    for i in range(rng.randint(1, 10))]
        passages = [DocPassage(doc_id="d", chunk_id=f"k{k}", chunk=k, source="notes.md", title="Notes",
                               heading=["Trips"], text=rng.choice(texts)) for k in range(rng.choice([0, 2]))]
        budget = rng.choice([60, 300, 1500])
        block = prompt_block(memories, passages, budget, rng.choice([20, 200]), rng.choice([0, 100]))
        assert block.tokens == (count_tokens(block.text) if block.text else 0)
        assert block.tokens <= budget


def test_counts_from_ltm_spare_the_tokenizer_and_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memories whose turns carry ltm's token counts give the very same block; with room for every turn, only turns
    longer than a line may be are tokenized (to find where to cut them)."""
    import services.chat_ai.prompt as prompt

    rng = random.Random(5)
    texts = _texts(rng, 200)
    encoded: list[str] = []
    real = prompt.wordpiece

    class Counting:
        def encode(self, text: str, add_special_tokens: bool = False):  # type: ignore[no-untyped-def]
            encoded.append(text)
            return real().encode(text, add_special_tokens=add_special_tokens)

    for trial in range(25):
        plain = [mem(f"{trial}-{i}", rng.choice(texts), 10.0 - i, ts=T0 + i,
                     context=[ctx(f"c{trial}-{i}-{j}", rng.choice(texts), T0 + i + j / 10) for j in range(3)])
                 for i in range(rng.randint(1, 8))]
        known = [m.model_copy(update={"tokens": count_tokens(m.content), "context": [
            c.model_copy(update={"tokens": count_tokens(c.content)}) for c in m.context]}) for m in plain]
        turn_tokens = rng.choice([20, 200])
        for budget in (80, 400, 1500, 100_000):
            expected = memory_block(plain, budget, turn_tokens)
            encoded.clear()
            monkeypatch.setattr(prompt, "wordpiece", Counting)
            got = memory_block(known, budget, turn_tokens)
            monkeypatch.setattr(prompt, "wordpiece", real)
            assert (got.text, got.tokens) == (expected.text, expected.tokens)
        # with room for everything (the last budget), what was tokenized is the text, or the head, of a long turn
        long = [t.content for m in plain for t in (m, *m.context) if count_tokens(t.content) > turn_tokens]
        assert all(any(text.startswith(e) for text in long) for e in encoded), [e[:60] for e in encoded]


def test_a_result_left_out_leaves_the_block_as_if_it_were_not_there() -> None:
    """A result that does not fit adds nothing, spends nothing and hides nothing: none of its context turns take
    budget or count as shown (they once did, and a later result lost the room and its own context turns)."""
    rng = random.Random(3)
    texts = _texts(rng, 120)
    shared = [ctx(f"shared-{j}", rng.choice(texts), T0 + j) for j in range(6)]
    checked = 0
    for trial in range(60):
        memories = [mem(f"{trial}-{i}", rng.choice(texts), 10.0 - i, ts=T0 + i,
                        context=[*rng.sample(shared, 3), ctx(f"c{trial}-{i}", rng.choice(_PIECES[:8]), T0 + i)])
                    for i in range(rng.randint(2, 8))]
        budget = rng.randint(60, 600)
        block = memory_block(memories, budget, 200)
        shown = {t.message_id for t in block.turns if t.anchor}
        for m in memories:
            if m.source.message_id not in shown:
                others = [o for o in memories if o is not m]
                assert memory_block(others, budget, 200).text == block.text, (trial, budget, m.memory_id)
                checked += 1
    assert checked > 100
