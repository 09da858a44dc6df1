"""Token counter, summarisers, preference encryption and the memory request models, without servers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from cryptography.fernet import Fernet

from services.memory.crypto import LazyCipher, PreferenceCipher, load_cipher
from services.memory.summary import (
    EXTRACTIVE,
    MAX_LLM_INPUT_CHARS,
    ExtractiveSummariser,
    LlmSummariser,
    SummaryState,
    entities_of,
    salience,
    salience_factor,
)
from services.memory.tokens import RegexCounter, WordPieceCounter, default_counter
from shared.contracts import DecodeError, decode
from shared.contracts.errors import MeshError
from shared.contracts.memory_api import MEMORY_REQUEST, StoreMessageRequest
from shared.runtime.stm import Turn


def turns(*texts: str, start: float = 100.0) -> list[Turn]:
    return [Turn(f"m{i}", "user" if i % 2 == 0 else "ai", t, start + i) for i, t in enumerate(texts)]


def test_the_counter_is_the_offline_wordpiece_tokenizer() -> None:
    counter = default_counter()
    assert isinstance(counter, WordPieceCounter)
    assert counter.count("") == 0
    assert counter.count("Hello there, my name is Ada.") == 8  # no [CLS]/[SEP]
    long = "word " * 1000
    assert counter.count(long) == 1000  # not truncated at the embedder's 128
    # additive over whitespace: what lets the summariser count lines once
    assert counter.count("one line here.\nanother, line") == counter.count("one line here.") + counter.count(
        "another, line")
    assert RegexCounter().count("Hi, you!") == 4


def test_entities_and_salience() -> None:
    found = entities_of("Yesterday I flew to New York with Maria on 12 May 2024, at 10:30.")
    assert {"New York", "Maria", "May", "2024", "10:30"} <= set(found) and "Yesterday" not in found
    assert "Maria" in entities_of("I met Maria.") and "I" not in entities_of("Then I left.")
    assert salience("ok", "user") == 0.0
    fact = salience("I work as a nurse at Hospital Santa Maria in Lisbon.", "user")
    assert fact > salience("The weather is nice today.", "user")
    assert fact > salience("I work as a nurse at Hospital Santa Maria in Lisbon.", "ai")


async def test_extractive_fold_is_progressive_and_within_budget() -> None:
    s = ExtractiveSummariser(default_counter(), 120)
    state = await s.fold(SummaryState(), turns("My daughter Ines starts school in Coimbra in September.",
                                               "That is exciting news for your family."))
    assert state.kind == EXTRACTIVE and state.turns == 2 and state.covered_until == 101.0
    assert "Ines" in state.text and state.text.startswith("Extractive summary of 2 earlier turns")
    assert default_counter().count(state.text) == state.tokens <= 120
    assert await s.fold(state, []) is state  # nothing to fold (which turns are new is the fold point's business)
    # many more turns: still under budget, and the strong early fact survives the chatter
    chatter = [f"Turn {i}: we chatted about the weather and lunch plans again." for i in range(200)]
    for t in turns(*chatter, start=200.0):
        state = await s.fold(state, [t])
    assert state.turns == 202 and state.tokens <= 120 and "Ines" in state.text
    restored = SummaryState.from_parts(state.text, json.loads(json.dumps(state.state_json())))
    assert [x.text for x in restored.sentences] == [x.text for x in state.sentences] and restored.turns == 202


def test_the_fold_point_rises_to_the_highest_index_folded_and_keeps_the_ones_it_skipped() -> None:
    state = SummaryState(folded_through=9)
    assert state.folding([]) == (9, [])
    assert state.folding([10, 11]) == (11, [])
    assert state.folding([14, 12]) == (14, [10, 11, 13])  # 10, 11, 13 still in the window: 12 and 14 came late
    later = replace(state, folded_through=14, not_folded=[10, 11, 13])
    assert later.folding([10, 11]) == (14, [13]) and later.folding([10, 11, 13, 15]) == (15, [])
    saved = SummaryState.from_parts("", json.loads(json.dumps(later.state_json())))
    assert (saved.folded_through, saved.not_folded) == (14, [10, 11, 13])
    # a state written before fold points were kept: unknown (the store converts it); an empty one: nothing folded
    old = later.state_json()
    del old["folded_through"], old["not_folded"]
    assert SummaryState.from_parts("x", {**old, "turns": 3}).folded_through is None
    assert SummaryState.from_parts("", {}).folded_through == -1


async def test_an_llm_summary_is_carried_on_by_the_extractive_fold() -> None:
    s = ExtractiveSummariser(default_counter(), 200)
    previous = SummaryState(text="The user is a chef in Braga. They plan a trip to Japan.", kind="llm:x", turns=30,
                            covered_until=50.0)
    state = await s.fold(previous, turns("Okay, and what about sushi knives?", start=60.0))
    assert "chef in Braga" in state.text and "earlier summary" in state.text and state.kind == EXTRACTIVE


class ScriptedModel:
    name = "scripted"

    def __init__(self, reply: str | Exception) -> None:
        self.reply = reply
        self.calls: list[list[dict[str, str]]] = []

    async def complete(self, messages: list[dict[str, str]], **_: object) -> str:
        self.calls.append(messages)
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


async def test_llm_summary_is_cut_to_the_budget_and_falls_back_on_failure() -> None:
    counter = default_counter()
    model = ScriptedModel("Ana lives in Faro. " * 200)
    s = LlmSummariser(model, counter, 60)
    state = await s.fold(SummaryState(), turns("I am Ana and I live in Faro."))
    assert state.kind == "llm:scripted" and state.tokens == counter.count(state.text) <= 60
    assert state.text.startswith("Ana lives in Faro.")
    one_long_sentence = ScriptedModel("word " * 500)
    cut = await LlmSummariser(one_long_sentence, counter, 60).fold(SummaryState(), turns("hello there friend"))
    assert 0 < cut.tokens <= 60
    broken = LlmSummariser(ScriptedModel(RuntimeError("down")), counter, 60)
    fallback = await broken.fold(SummaryState(), turns("I am Ana and I live in Faro."))
    assert fallback.kind == EXTRACTIVE and "Faro" in fallback.text


class RecordingModel:
    """A fake ChatModel that records each call's new turns and answers with a short summary of its own."""

    name = "recording"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def complete(self, messages: list[dict[str, str]], **_: object) -> str:
        prompt = messages[1]["content"]
        assert len(prompt) <= MAX_LLM_INPUT_CHARS + 100, len(prompt)  # the summary and the turns fit one call
        self.sent.append(prompt.split("\n\nNew turns:\n", 1)[1])
        return f"Summary number {len(self.sent)} of the conversation so far."


async def test_an_llm_fold_of_a_large_backlog_sends_every_turn_once() -> None:
    """An import of 500 turns is folded in one call of the summariser: the turns go to the model in successive
    chunks that each fit, every turn exactly once (the transcript was cut to its last 24,000 characters, and the
    turns before them, marked folded, never reached the summary)."""
    many = [Turn(f"m{i}", "user" if i % 2 == 0 else "ai", f"Turn {i:03d}: I planted {i} tulips by the old stone wall "
                 f"in the garden on Sunday morning.", 100.0 + i) for i in range(500)]
    model = RecordingModel()
    state = await LlmSummariser(model, default_counter(), 200).fold(SummaryState(turns=3, text="Before."), many)
    assert len(model.sent) >= 2 and state.turns == 503 and state.kind == "llm:recording"
    assert state.text == f"Summary number {len(model.sent)} of the conversation so far."
    sent = "\n".join(model.sent)
    for t in many:
        assert sent.count(t.content) == 1, t.message_id
    assert sent.index(many[0].content) < sent.index(many[-1].content)  # in the order they were said


async def test_a_turn_longer_than_a_call_is_sent_in_parts() -> None:
    long = " ".join(f"word{i}" for i in range(8_000))  # about 70,000 characters
    model = RecordingModel()
    said = [Turn("a", "user", "I live in Porto.", 1.0), Turn("b", "ai", long, 2.0), Turn("c", "user", "Bye now.", 3.0)]
    state = await LlmSummariser(model, default_counter(), 200).fold(SummaryState(), said)
    assert len(model.sent) >= 3 and state.turns == 3
    parts = [line.split(": ", 1)[1] for chunk in model.sent for line in chunk.split("\n")]
    assert parts[0] == "I live in Porto." and parts[-1] == "Bye now." and "".join(parts[1:-1]) == long
    assert all(chunk.startswith("assistant (continued): ") for chunk in model.sent[1:])


def test_preference_cipher_round_trip_rotation_and_dev_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    token = load_cipher(old).encrypt({"card": "1234"})
    assert b"1234" not in token
    rotated = load_cipher(f"{new},{old}")
    assert rotated.decrypt(token) == {"card": "1234"}  # the old key still decrypts
    assert load_cipher(new).decrypt(rotated.encrypt("x")) == "x"  # the new key encrypts
    with pytest.raises(MeshError, match="cannot be decrypted"):  # answered as internal, with this message
        load_cipher(new).decrypt(token)
    key_file = tmp_path / "keys" / "dev.key"
    lazy = LazyCipher(None, key_file)
    assert not key_file.exists()  # nothing is made until a sensitive value is used
    assert lazy.decrypt(lazy.encrypt([1, 2])) == [1, 2]
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert PreferenceCipher([key_file.read_bytes()]).decrypt(lazy.encrypt("same key")) == "same key"


def test_memory_request_models() -> None:
    req = decode(MEMORY_REQUEST, json.dumps({"request_id": "r", "type": "store_message", "user_id": "u",
                                             "data": {"session_id": "s", "content": "hi", "extra": 1}}))
    assert isinstance(req, StoreMessageRequest) and req.data.role == "human"
    with pytest.raises(DecodeError) as unknown:
        decode(MEMORY_REQUEST, json.dumps({"request_id": "r", "type": "nope", "user_id": "u", "data": {}}))
    assert unknown.value.code == "unknown_type" and unknown.value.request_id == "r"
    with pytest.raises(DecodeError) as no_user:
        decode(MEMORY_REQUEST, json.dumps({"request_id": "r", "type": "get_session", "data": {"session_id": "s"}}))
    assert no_user.value.code == "bad_request"
    with pytest.raises(DecodeError) as too_big:
        decode(MEMORY_REQUEST, json.dumps({"request_id": "r", "type": "store_message", "user_id": "u",
                                           "data": {"session_id": "s", "content": "x" * 40_000}}))
    assert too_big.value.code == "bad_request"


def test_the_salience_model_weighs_in_what_the_summary_keeps() -> None:
    """STM_SALIENCE_WEIGHT: each sentence's score is scaled by 1 + weight x the turn's model salience (unknown:
    the middle); with room for one sentence of two equally plain ones, the more salient turn's is kept."""
    assert salience_factor(0.9, 0.0) == 1.0 and salience_factor(None, 0.0) == 1.0
    assert salience_factor(0.9, 2.0) == pytest.approx(2.8) and salience_factor(None, 2.0) == pytest.approx(2.0)
    assert salience_factor(7.0, 1.0) == 2.0  # clipped to the scale
    counter = default_counter()
    plain = turns("We walked along the river path near the old mill today.",
                  "We walked along the canal path near the new bridge today.")
    header = ExtractiveSummariser(counter, 1)._header(2)
    budget = counter.count(header) + counter.count("- assistant: " + plain[1].content) + 2  # room for one of them
    off = ExtractiveSummariser(counter, budget).fold_sync(SummaryState(), plain, {"m0": 0.0, "m1": 1.0})
    on = ExtractiveSummariser(counter, budget, salience_weight=4.0).fold_sync(SummaryState(), plain,
                                                                             {"m0": 0.0, "m1": 1.0})
    assert [s.text for s in off.sentences] == [plain[0].content]  # the user's words win on the heuristic alone
    assert [s.text for s in on.sentences] == [plain[1].content]  # the model's score outweighs that


NON_LATIN = {
    "Cyrillic": "Моя собака Рекс живёт в Москве уже пять лет.",
    "Chinese": "我的狗叫雷克斯，它住在北京。",  # noqa: RUF001 - a Chinese comma
    "Greek": "Ο σκύλος μου λέγεται Ρεξ και ζει στην Αθήνα.",  # noqa: RUF001 - Greek letters
    "Arabic": "كلبي اسمه ريكس ويعيش في القاهرة.",
    "Devanagari": "मेरा कुत्ता रेक्स दिल्ली में रहता है।",
}


def test_non_latin_turns_are_summarised_like_latin_ones() -> None:
    """Words, scores and keys in any script: a turn without Latin letters scored 0 (and had the key ""), so it was
    skipped while its turn was marked folded, gone from the STM once out of the window."""
    counter = default_counter()
    for script, text in NON_LATIN.items():
        assert salience(text, "user") > 0, script
    assert salience("好的", "user") == salience("ок", "user") == 0.0  # "ok" in any script says nothing
    assert "Рекс" in entities_of(NON_LATIN["Cyrillic"]) and "Αθήνα" in entities_of(NON_LATIN["Greek"])
    chatter = [f"Turn {i}: the user and the assistant talked about the weather." for i in range(3)]
    state = ExtractiveSummariser(counter, 400).fold_sync(SummaryState(), turns(*NON_LATIN.values(), *chatter))
    for script, text in NON_LATIN.items():
        assert text in state.text, script
    assert counter.count(state.text) == state.tokens <= 400
    # distinct sentences of one script are distinct keys (all were "" before): both kept, a repeat kept once
    two = ExtractiveSummariser(counter, 400).fold_sync(SummaryState(), turns(
        "Я работаю врачом в больнице Санкт-Петербурга.", "Моя сестра Анна учится в Казани.",
        "Я работаю врачом в больнице Санкт-Петербурга."))
    assert [s.text for s in two.sentences] == ["Моя сестра Анна учится в Казани.",
                                               "Я работаю врачом в больнице Санкт-Петербурга."]


def test_a_sentence_said_again_is_counted_as_it_is_kept() -> None:
    """The same words again with other punctuation share a key, and the newer text is kept: its own token count,
    not the first one's, or the summary ran over its budget while ``tokens`` reported less."""
    counter = default_counter()
    short, padded = "I told you my dog is called Rex", "I told you my dog is called Rex , , , , , , , , , , , , ...!"
    said = turns(short, padded)
    said[1] = Turn("m1", "user", padded, said[1].timestamp)
    header = ExtractiveSummariser(counter, 1)._header(2)
    entity = ExtractiveSummariser(counter, 1)._entity_line(["Rex"])
    for budget in (counter.count(header) + counter.count(entity) + counter.count("- user: " + short) + 2, 400):
        state = ExtractiveSummariser(counter, budget).fold_sync(SummaryState(), said)
        assert counter.count(state.text) == state.tokens <= budget, budget
    assert padded in state.text


async def test_a_backlog_too_large_for_the_lock_is_folded_extractively_at_once() -> None:
    """Every turn reaches the summary, but a backlog of more than MAX_LLM_BACKLOG_CHARS would take one model call
    after another under the session's lock (120 s): it is folded extractively, without the model."""
    from services.memory.summary import MAX_LLM_BACKLOG_CHARS

    n = MAX_LLM_BACKLOG_CHARS // 60 + 10
    many = [Turn(f"m{i}", "user", f"Turn {i:05d}: I planted {i} tulips by the old stone wall in the garden.", 1.0 + i)
            for i in range(n)]
    model = RecordingModel()
    state = await LlmSummariser(model, default_counter(), 200).fold(SummaryState(turns=3, text="Before."), many)
    assert model.sent == [] and state.kind == "extractive" and state.turns == 3 + n
