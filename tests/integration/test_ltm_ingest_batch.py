"""Batched ingest on real PostgreSQL: a batch leaves the tables as one update after another would, a bad update
fails alone, and embedding passes and the NER-only path behave as services/ltm/ingest.py says."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from services.ltm.config import LtmSettings
from services.ltm.native import NativeBackend
from services.ltm.store import LtmStore
from shared.contracts import MemoryUpdate
from shared.runtime.embedding import Embedder
from shared.runtime.passes import embed_in_steps, steps, tokens
from tests.helpers import Mesh, common

DAY = 86400.0

# repeats on purpose: the same statement in several turns, the same turn text twice, a slot that changes
TURNS = [
    ("I love hiking. My sister Alice lives in Porto.", "user"),
    ("I live in Lisbon and I work at Acme.", "user"),
    ("Thanks!", "user"),
    ("Alice came over yesterday. I love hiking.", "user"),
    ("Alice from Acme recommended Porto to me.", "ai"),
    ("I moved to Berlin last week.", "user"),
    ("Thanks!", "user"),
    ("I love hiking and I work at Acme.", "user"),
]

SNAPSHOT = {
    "memories": "SELECT type, content, confidence, mentions, subject, slot, slot_value, valid_from, asserted_at,"
                " valid_to IS NULL, superseded_by IS NULL, source_message_id, entities,"
                " (SELECT array_agg(s ->> 'message_id' ORDER BY o) FROM jsonb_array_elements(sources)"
                " WITH ORDINALITY AS x(s, o)) FROM ltm_memories WHERE user_id = %s ORDER BY type, content",
    "entities": "SELECT name, name_norm, type, mentions, first_seen, last_seen FROM ltm_entities WHERE user_id = %s"
                " ORDER BY name_norm",
    "relations": "SELECT s.name_norm, r.predicate, o.name_norm, r.strength, r.confidence, r.valid_from,"
                 " r.valid_to IS NULL, m.content FROM ltm_relations r JOIN ltm_entities s ON s.entity_id = r.subject_id"
                 " JOIN ltm_entities o ON o.entity_id = r.object_id JOIN ltm_memories m ON m.memory_id = r.memory_id"
                 " WHERE r.user_id = %s ORDER BY 1, 2, 3",
    "links": "SELECT m.type, m.content, e.name_norm, l.role FROM ltm_memory_entities l"
             " JOIN ltm_memories m ON m.memory_id = l.memory_id JOIN ltm_entities e ON e.entity_id = l.entity_id"
             " WHERE l.user_id = %s ORDER BY 1, 2, 3, 4",
}


def backend(mesh: Mesh, **kw: Any) -> NativeBackend:
    settings = LtmSettings(**{**common(mesh.redis_url, mesh.database_url), **kw})
    return NativeBackend(LtmStore(mesh.pool), Embedder(mesh.model), settings=settings)


def updates(user: str, t0: float) -> list[MemoryUpdate]:
    # message ids shared by both users' runs, so that provenance compares equal
    return [MemoryUpdate(user_id=user, content=text, source=source, timestamp=t0 + i * DAY,  # type: ignore[arg-type]
                         meta={"session_id": "s1", "message_id": f"m{i}", "speaker": "Dana" if source == "user"
                               else ""})
            for i, (text, source) in enumerate(TURNS)]


async def snapshot(mesh: Mesh, user: str) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    async with mesh.pool.connection() as conn:
        for name, sql in SNAPSHOT.items():
            cur = await conn.execute(sql, (user,))
            out[name] = [tuple(r) for r in await cur.fetchall()]
    return out


async def test_a_batch_leaves_the_tables_as_one_update_after_another_would(mesh: Mesh) -> None:
    t0 = time.time() - 30 * DAY
    one_by_one = backend(mesh)
    for u in updates("seq", t0):
        assert await one_by_one.ingest(u) is True

    batched = backend(mesh)
    sizes: list[int] = []
    ingest_many = batched.store.ingest_many

    async def spy(writes: Any, then: Any = None) -> list[bool]:
        sizes.append(len(writes))
        return await ingest_many(writes, then)

    batched.store.ingest_many = spy  # type: ignore[method-assign]
    batch = updates("bat", t0)
    results = await asyncio.gather(*(batched.ingest(u) for u in [*batch, batch[1]]))  # m1 delivered twice
    assert results == [True] * len(batch) + [False]
    assert max(sizes) > 1  # the updates were written together, not one by one

    seq, bat = await snapshot(mesh, "seq"), await snapshot(mesh, "bat")
    assert seq["memories"] and seq["entities"] and seq["relations"] and seq["links"]
    assert bat == seq
    # the merged rows are right in themselves, not only equal
    hiking = next(r for r in bat["memories"] if r[1] == "Dana loves hiking")
    assert hiking[3] == 3 and hiking[13] == ["m0", "m3", "m7"]
    assert [r[1] for r in bat["memories"] if r[0] == "episodic"].count("Thanks!") == 1
    acme = next(r for r in bat["entities"] if r[1] == "acme")
    assert acme[3] >= 3 and acme[4] == t0 + DAY
    lisbon = next(r for r in bat["memories"] if r[1] == "Dana lives in Lisbon")
    assert lisbon[9] is False  # superseded by the move to Berlin
    assert await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id = 'bat'") == len(batch)


async def test_a_bad_update_fails_alone_and_the_rest_of_its_batch_is_stored(mesh: Mesh) -> None:
    b = backend(mesh)
    ts = time.time()
    good = [MemoryUpdate(user_id="u1", content=f"I love sport number {i}.", timestamp=ts + i,
                         meta={"message_id": f"g{i}"}) for i in range(3)]
    bad = MemoryUpdate(user_id="u1", content="I love tea\x00 very much.", timestamp=ts + 10, meta={"message_id": "bad"})
    results = await asyncio.gather(*(b.ingest(u) for u in [good[0], bad, good[1], good[2]]), return_exceptions=True)
    assert results[0] is True and results[2] is True and results[3] is True
    assert isinstance(results[1], Exception)
    assert await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id = 'u1'") == 3
    assert await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id = 'u1' AND type = 'episodic'") == 3
    # a redelivery of the good ones is recognised before any work
    assert await asyncio.gather(*(b.ingest(u) for u in good)) == [False, False, False]


class CountingEmbedder(Embedder):
    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.passes: list[list[str]] = []

    async def embed_many(self, texts: list[str]) -> list[np.ndarray]:
        self.passes.append(list(texts))
        return await super().embed_many(texts)


async def test_embedding_passes_stay_within_the_token_budget_and_give_the_models_vectors(mesh: Mesh) -> None:
    embedder = CountingEmbedder(mesh.model)
    texts = [f"short text {i}" for i in range(12)] + ["a longer text " * 30, "a longer text " * 30, "x" * 4000]
    vectors = await embed_in_steps(embedder, texts, 64)
    assert set(vectors) == set(texts) and sum(len(p) for p in embedder.passes) == len(set(texts))
    for p in embedder.passes:
        assert len(p) == 1 or len(p) * max(tokens(t) for t in p) <= 64
    direct = mesh.model.encode(list(vectors))
    for text, vec in zip(vectors, direct, strict=True):
        assert float(np.dot(vectors[text], vec)) > 0.9999


def test_steps_cut_a_sequence_by_budget() -> None:
    assert list(steps([3, 3, 3, 9, 1], lambda n: n, 6)) == [[3, 3], [3], [9], [1]]
    assert list(steps([], lambda n: n, 6)) == []


def test_turns_no_rule_can_match_get_the_same_entities_through_the_ner_only_pipeline() -> None:
    from services.ltm.extraction import RuleExtractor, Turn
    from services.ltm.extraction.rules import needs_rules

    rules = RuleExtractor()
    nlp = rules.nlp
    turns = [
        Turn("Alice from Acme recommended Porto, and Google Maps shows the route via Coimbra.", 0.0, "Assistant", "ai"),
        Turn("Melanie went to Paris with Caroline in May.", 0.0, "Dana", "user"),  # no cue: entities only
        Turn("I love Paris and I work at Acme.", 0.0, "Dana", "user"),  # cues: the rules run
        Turn("From now on use metric units.", 0.0, "Dana", "user"),
    ]
    assert [needs_rules(nlp.make_doc(t.text), t) for t in turns] == [False, False, True, True]
    out = rules.extract_batch(turns)
    for turn, items in zip(turns, out, strict=True):
        expected = RuleExtractor._entities(nlp(turn.text), turn)  # the whole pipeline's entities
        assert [it for it in items if it.type == "entity"] == expected
    assert all(any(it.type == "entity" for it in items) for items in out[:3])
    assert {it.type for it in out[0] + out[1]} == {"entity"}
    assert {"preference", "fact"} <= {it.type for it in out[2]}
    assert [it.type for it in out[3]] == ["instruction"]


async def test_ingest_has_its_own_model_so_a_search_embedding_never_waits_for_an_ingest_pass(mesh: Mesh) -> None:
    from shared.runtime.embedding import dedicated_model

    b = backend(mesh)
    await b.start()
    assert b.ingest_embedder.model is dedicated_model("ingest", b._settings)
    assert b.ingest_embedder is not b.embedder and b.ingest_embedder.model is not mesh.model
    assert b.embedder.model is mesh.model
    text = "Caroline went to the support group."
    assert float(np.dot((await b.ingest_embedder.embed_many([text]))[0], mesh.model.encode([text])[0])) > 0.9999
    with b.ingest_embedder.model._lock:  # an ingest pass that holds its model
        await asyncio.wait_for(b.embedder.embed("what did Caroline do?"), 10)
    shared = backend(mesh, ltm_ingest_model="shared")
    await shared.start()
    assert shared.ingest_embedder is shared.embedder


async def test_a_huge_speaker_name_is_cut_and_the_update_stored(mesh: Mesh) -> None:
    """A 6,000-character meta.speaker once exceeded the entities' btree row limit and was retried forever."""
    b = backend(mesh)
    huge = "Zed" + "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(6000))  # not compressible
    update = MemoryUpdate(user_id="u-huge", content="I adopted a parrot named Kiwi.", timestamp=time.time(),
                          meta={"message_id": "m-huge", "speaker": huge})
    assert await b.ingest(update) is True
    speakers = await mesh.count("SELECT max(length(speaker)) FROM ltm_memories WHERE user_id = 'u-huge'")
    assert 0 < speakers <= 200


async def test_a_program_limit_error_is_the_messages_fault_not_an_outage(mesh: Mesh) -> None:
    import psycopg

    from shared.runtime.errors import is_transient

    async with mesh.pool.connection() as conn:
        await conn.execute("CREATE TEMP TABLE too_big (k text PRIMARY KEY)")
        try:
            await conn.execute("INSERT INTO too_big SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i")
        except psycopg.Error as exc:
            error: psycopg.Error = exc
        else:
            raise AssertionError("PostgreSQL took an index row over its limit")
    assert isinstance(error, psycopg.OperationalError) and error.sqlstate == "54000"
    assert not is_transient(error)
    assert is_transient(psycopg.OperationalError("connection refused"))


async def stored_vector(mesh: Mesh, user_id: str, message_id: str) -> np.ndarray:
    """The embedding stored for a turn's episodic memory."""
    async with mesh.pool.connection() as conn:
        cur = await conn.execute("SELECT embedding FROM ltm_memories WHERE user_id = %s AND source_message_id = %s"
                                 " AND type = 'episodic'", (user_id, message_id))
        row = await cur.fetchone()
    assert row is not None
    return row[0].to_numpy() if hasattr(row[0], "to_numpy") else np.asarray(row[0])


async def test_a_turn_just_searched_for_is_ingested_with_the_searchs_vector(mesh: Mesh) -> None:
    """chat_ai searches with the turn's own text; ingesting that turn moments later reuses the query's vector
    instead of embedding it again (the same vector: the same model)."""
    from shared.contracts.messages import SearchData

    b = backend(mesh)
    text = "My neighbour Priya keeps three beehives on her roof."
    await b.search("u-reuse", SearchData(query=text, limit=5))
    update = MemoryUpdate(user_id="u-reuse", content=text, timestamp=time.time(), meta={"message_id": "m-reuse"})
    assert await b.ingest(update) is True
    assert b.reused_query_vectors == 1
    other = MemoryUpdate(user_id="u-reuse", content="A turn nobody searched for.", timestamp=time.time(),
                         meta={"message_id": "m-other"})
    assert await b.ingest(other) is True
    assert b.reused_query_vectors == 1  # embedded as before
    stored = await stored_vector(mesh, "u-reuse", "m-reuse")
    assert float(np.dot(stored, mesh.model.encode([text])[0])) > 0.9999


async def test_with_int8_queries_every_stored_vector_is_the_float_models(mesh: Mesh) -> None:
    """LTM_QUERY_INT8 (the default of build_backend): a query's vector comes from the int8 copy, so a turn just
    searched for is embedded again by the float model when ingested (no query vector is ever stored), and the
    int8 query finds it."""
    from shared.contracts.messages import SearchData
    from shared.runtime.embedding import dedicated_model

    settings = LtmSettings(**common(mesh.redis_url, mesh.database_url))
    b = NativeBackend(LtmStore(mesh.pool), Embedder(mesh.model), settings=settings,
                      query_embedder=Embedder(dedicated_model("query", int8=True)))
    await b.start()
    text = "My neighbour Priya keeps three beehives on her roof."
    await b.search("u-int8", SearchData(query=text, limit=5))
    update = MemoryUpdate(user_id="u-int8", content=text, timestamp=time.time(), meta={"message_id": "m-int8"})
    assert await b.ingest(update) is True
    assert b.reused_query_vectors == 0
    stored = await stored_vector(mesh, "u-int8", "m-int8")
    assert float(np.dot(stored, mesh.model.encode([text])[0])) > 0.9999
    assert float(np.dot(stored, dedicated_model("query", int8=True).encode([text])[0])) < 0.9999  # int8 differs
    found = await b.search("u-int8", SearchData(query="Who keeps bees on a roof?", limit=3))
    assert found and found[0].content == text


async def test_build_backend_wires_int8_queries_and_float_storage(mesh: Mesh) -> None:
    """What LtmService runs by default (build_backend, LTM_QUERY_INT8, LTM_INGEST_MODEL=own): searches embed with
    the int8 copy, ingest, add and documents with the float model (no second float copy is loaded); an int8 model
    is refused as the stored vectors' model; with LTM_QUERY_INT8=false searches use the float model."""
    from services.ltm.service import build_backend
    from shared.contracts.messages import AddData

    settings = LtmSettings(**common(mesh.redis_url, mesh.database_url))
    b = build_backend(settings, mesh.pool, mesh.model, mesh.redis, mesh.names)
    assert isinstance(b, NativeBackend)
    await b.start()
    assert b.query_embedder.model.quantized and not b.embedder.model.quantized
    assert b.ingest_embedder.model is mesh.model
    added = await b.add("u-wire", AddData(content="I collect vintage typewriters.", type="fact"))
    async with mesh.pool.connection() as conn:
        cur = await conn.execute("SELECT embedding FROM ltm_memories WHERE user_id = 'u-wire' AND memory_id = %s",
                                 (added.memory_id,))
        row = await cur.fetchone()
    assert row is not None
    stored = row[0].to_numpy() if hasattr(row[0], "to_numpy") else np.asarray(row[0])
    assert float(np.dot(stored, mesh.model.encode(["I collect vintage typewriters."])[0])) > 0.9999
    with pytest.raises(ValueError, match="float"):
        NativeBackend(LtmStore(mesh.pool), b.query_embedder, settings=settings)
    off = build_backend(settings.model_copy(update={"ltm_query_int8": False}), mesh.pool, mesh.model, mesh.redis,
                        mesh.names)
    assert isinstance(off, NativeBackend) and off.query_embedder is off.embedder


async def test_with_int8_ingest_what_is_stored_is_the_int8_copys_and_a_searched_turn_reuses_its_query(
        mesh: Mesh) -> None:
    """LTM_INGEST_INT8: ingest (and add) embed with an int8 copy of their own (not the searches'), so a turn just
    searched for is stored with its query's vector; without LTM_QUERY_INT8 the setting does nothing."""
    from services.ltm.service import build_backend
    from shared.contracts.messages import AddData, SearchData
    from shared.runtime.embedding import dedicated_model

    settings = LtmSettings(**common(mesh.redis_url, mesh.database_url), ltm_ingest_int8=True)
    b = build_backend(settings, mesh.pool, mesh.model, mesh.redis, mesh.names)
    assert isinstance(b, NativeBackend)
    await b.start()
    assert b.ingest_embedder.model is dedicated_model("ingest", settings, int8=True)
    assert b.ingest_embedder.model.quantized and b.ingest_embedder.model is not b.query_embedder.model
    text = "My neighbour Priya keeps three beehives on her roof."
    await b.search("u-i8", SearchData(query=text, limit=5))
    update = MemoryUpdate(user_id="u-i8", content=text, timestamp=time.time(), meta={"message_id": "m-i8"})
    assert await b.ingest(update) is True
    assert b.reused_query_vectors == 1
    int8 = dedicated_model("query", settings, int8=True)
    assert float(np.dot(await stored_vector(mesh, "u-i8", "m-i8"), int8.encode([text])[0])) > 0.9999
    other = "A turn nobody searched for, about sailing."
    assert await b.ingest(MemoryUpdate(user_id="u-i8", content=other, timestamp=time.time(),
                                       meta={"message_id": "m-i8b"})) is True
    assert float(np.dot(await stored_vector(mesh, "u-i8", "m-i8b"), int8.encode([other])[0])) > 0.9999
    added = await b.add("u-i8", AddData(content="I collect vintage typewriters.", type="fact"))
    found = await b.search("u-i8", SearchData(query="What do I collect?", limit=3))
    assert added.memory_id in {m.memory_id for m in found}
    # an ingest child (LTM_ROLE=ingest, the default layout) stores the int8 copy's vectors too (it once took the
    # float model there, since it makes no copy of its own)
    child = build_backend(settings.model_copy(update={"ltm_role": "ingest"}), mesh.pool, mesh.model, mesh.redis,
                          mesh.names)
    assert isinstance(child, NativeBackend)
    await child.start()
    assert child.ingest_embedder.model is int8
    third = "A turn ingested by a process that serves no search, about kayaks."
    assert await child.ingest(MemoryUpdate(user_id="u-i8", content=third, timestamp=time.time(),
                                           meta={"message_id": "m-i8c"})) is True
    # the int8 copy's vector, not the float model's (which is the same in any pass): int8 quantizes each pass's
    # activations with one scale, so a text's vector moves a little with what shares its pass (cos ~0.99)
    assert 0.97 < float(np.dot(await stored_vector(mesh, "u-i8", "m-i8c"), mesh.model.encode([third])[0])) < 0.999
    off = build_backend(settings.model_copy(update={"ltm_query_int8": False}), mesh.pool, mesh.model, mesh.redis,
                        mesh.names)
    assert isinstance(off, NativeBackend)
    await off.start()
    assert not off.ingest_embedder.model.quantized and off.query_embedder is off.embedder


async def test_a_batch_counts_its_tokens_once(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokens of what a batch writes are counted once (a thread), then stored with the rows."""
    from services.ltm import native

    calls: list[int] = []
    count = native.token_counts

    def counting(texts: list[str]) -> list[int]:
        calls.append(len(texts))
        return count(texts)

    monkeypatch.setattr(native, "token_counts", counting)
    b = backend(mesh)
    t0 = time.time()
    oks = await asyncio.gather(*(b.ingest(MemoryUpdate(user_id="u-count", content=f"Turn number {i} of a batch.",
                                                       timestamp=t0 + i, meta={"message_id": f"c{i}"}))
                                 for i in range(6)))
    assert all(oks) and 1 <= len(calls) <= 6 and sum(calls) >= 6
    async with mesh.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM ltm_memories WHERE user_id = 'u-count'"
                                 " AND content_tokens IS NULL")
        row = await cur.fetchone()
    assert row is not None and row[0] == 0


async def test_a_failed_batch_written_one_by_one_counts_no_token_again(mesh: Mesh,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose transaction fails is written one update at a time with the counts already made: no content is
    tokenized twice, and every row still carries its count."""
    from services.ltm import native

    counted: list[str] = []
    count = native.token_counts

    def counting(texts: list[str]) -> list[int]:
        counted.extend(texts)
        return count(texts)

    monkeypatch.setattr(native, "token_counts", counting)
    b = backend(mesh, ltm_extraction="off")
    sizes: list[int] = []
    ingest_many = b.store.ingest_many

    async def failing_together(writes: Any, then: Any = None) -> list[bool]:
        sizes.append(len(writes))
        if len(writes) > 1:
            raise ValueError("a batch that cannot be written together")
        return await ingest_many(writes, then)

    b.store.ingest_many = failing_together  # type: ignore[method-assign]
    t0 = time.time()
    oks = await asyncio.gather(*(b.ingest(MemoryUpdate(user_id="u-retry", content=f"Retried turn number {i}.",
                                                       timestamp=t0 + i, meta={"message_id": f"r{i}"}))
                                 for i in range(6)))
    assert all(oks) and max(sizes) > 1, sizes  # a batch failed and its updates were written alone
    assert sorted(counted) == sorted(f"Retried turn number {i}." for i in range(6)), counted
    async with mesh.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*), count(content_tokens) FROM ltm_memories WHERE user_id = 'u-retry'")
        row = await cur.fetchone()
    assert row == (6, 6)


async def test_one_query_asked_at_once_twice_is_embedded_once(mesh: Mesh) -> None:
    """chat_ai's memory search and doc_search of one turn carry the same text: they share one embedding pass, and
    an asker that gives up does not cancel the other's."""
    b = backend(mesh)
    calls: list[str] = []
    embed = b.embedder.embed

    async def counted(text: str) -> np.ndarray:
        calls.append(text)
        return await embed(text)

    b.embedder.embed = counted  # type: ignore[method-assign]
    text = "Where does my sister keep her sailing boat?"
    first = asyncio.ensure_future(b._query_vector(text))
    second = asyncio.ensure_future(b._query_vector(text))
    await asyncio.sleep(0)
    first.cancel()
    vec = await asyncio.wait_for(second, 10)
    assert calls == [text]
    assert float(np.dot(vec, mesh.model.encode([text])[0])) > 0.9999
    again = await b._query_vector(text)  # from the cache now
    assert calls == [text] and again is vec


async def test_ingest_counts_the_tokens_it_stores_so_a_search_tokenizes_nothing(mesh: Mesh) -> None:
    """Every memory ingest writes carries its WordPiece count (content_tokens), the one a search's budget uses; a
    search over those rows packs its results without calling the tokenizer (its cache stays empty)."""
    from services.ltm import retrieval
    from shared.contracts.messages import SearchData

    b = backend(mesh)
    for u in updates("tok", time.time() - 30 * DAY):
        assert await b.ingest(u) is True
    async with mesh.pool.connection() as conn:
        cur = await conn.execute("SELECT content, content_tokens FROM ltm_memories WHERE user_id = 'tok'")
        rows = await cur.fetchall()
    assert len(rows) > len(TURNS)  # the turns and what was extracted from them
    assert [n for _, n in rows] == retrieval.token_counts([c for c, _ in rows])
    retrieval.clear_token_cache()
    found = await b.search("tok", SearchData(query="Where does Dana live now?", limit=5))
    assert found and any(m.context for m in found)  # results and their neighbouring turns were packed
    assert len(retrieval._TOKEN_CACHE) == 0


@pytest.mark.parametrize("role", ["all", "ingest"])
async def test_extraction_steps_are_larger_where_no_search_shares_the_process(mesh: Mesh, role: str) -> None:
    """Where searches share the process a spaCy step holds their GIL: LTM_INGEST_STEP_TOKENS (256 tokens); an
    ingest child (LTM_ROLE=ingest) extracts in LTM_EXTRACT_STEP_TOKENS (1024) steps, which cost less per turn."""
    from shared.runtime.passes import tokens

    b = backend(mesh, ltm_role=role)
    assert b.extraction is not None
    calls: list[int] = []
    run = b.extraction.rules.extract_batch

    def counting(turns: Any) -> Any:
        calls.append(len(turns))
        return run(turns)

    b.extraction.rules.extract_batch = counting  # type: ignore[method-assign]
    t0 = time.time()
    texts = [f"Dana said the ferry to the island leaves at nine and the hostel by the harbour is cheap ({i})."
             for i in range(30)]
    oks = await asyncio.gather(*(b.ingest(MemoryUpdate(user_id=f"u-step-{role}", content=text, timestamp=t0 + i,
                                                       meta={"message_id": f"st{i}"}))
                                 for i, text in enumerate(texts)))
    assert all(oks) and sum(calls) == len(texts)
    small = 256 // tokens(texts[0])  # turns in one step of 256 tokens
    assert (max(calls) <= small) if role == "all" else (max(calls) > 2 * small), (calls, small)
