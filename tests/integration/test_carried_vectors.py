"""One embedding per message: memory embeds a message as it stores it and carries the vector (and the turn's
salience) on its MemoryUpdate; ltm stores that vector as its own and embeds only what it cannot trust."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import numpy as np
import pytest

from services.ltm.config import LtmSettings
from services.ltm.native import NativeBackend
from services.ltm.store import LtmStore
from services.memory.store import StoredMessage
from shared.contracts import MEMORY_UPDATE, DecodeError, MemoryUpdate, decode
from shared.contracts.memory_api import ImportMessage
from shared.contracts.messages import OFFLINE_MODEL, CarriedEmbedding
from shared.runtime.carried import carry
from shared.runtime.embedding import MODEL_NAME, Embedder
from shared.runtime.metrics import Metrics
from tests.helpers import Mesh, common, running, wait_until

TURNS = ["Hi! How are you?", "Good, thanks. And you?",
         "My sister Anna moved to Lisbon last week, she works at a bakery.",
         "That is a big move, how does she like it?", "She loves it. I am flying there in May to see her.", "Cool!"]


def backend(mesh: Mesh, **kw: Any) -> tuple[NativeBackend, Metrics]:
    settings = LtmSettings(**{**common(mesh.redis_url, mesh.database_url), "ltm_extraction": "rules", **kw})
    native = NativeBackend(LtmStore(mesh.pool), Embedder(mesh.model), settings=settings, redis=mesh.redis,
                           names=mesh.names)
    metrics = Metrics()
    native.bind_metrics(metrics)
    return native, metrics


async def episodic(mesh: Mesh, user: str) -> dict[str, tuple[np.ndarray, float | None]]:
    """content -> (stored vector, salience) of the user's episodic memories."""
    async with mesh.pool.connection() as conn:
        cur = await conn.execute("SELECT content, embedding::text, salience FROM ltm_memories"
                                 " WHERE user_id = %s AND type = 'episodic'", (user,))
        return {r[0]: (np.array(json.loads(r[1]), dtype=np.float32), r[2]) for r in await cur.fetchall()}


async def published(mesh: Mesh) -> list[MemoryUpdate]:
    return [decode(MEMORY_UPDATE, f[b"data"]) for _, f in await mesh.redis.xrange(mesh.names.memory_updates)]


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


async def test_memory_carries_each_new_messages_vector_and_ltm_stores_it_with_the_same_salience(mesh: Mesh) -> None:
    """A session through memory's write path: every update carries the message's own vector (the one stored for
    search_messages) and a salience; ltm stores those, not vectors of its own, and they equal what ltm computes
    itself for the same turns published without a vector (another user): the same vectors, the same scores."""
    memory = mesh.memory()
    assert memory.api.carrier is not None  # MEMORY_CARRY_VECTORS, the default
    now = time.time()
    for i, text in enumerate(TURNS):
        await memory.api.record(StoredMessage(message_id=f"cv-{i}", session_id="cv", user_id="u-cv",
                                              role="human" if i % 2 == 0 else "ai", content=text, timestamp=now + i))
    updates = await published(mesh)
    assert [u.content for u in updates] == TURNS
    own = mesh.model.encode(TURNS)
    for u, vec in zip(updates, own, strict=True):
        assert u.embedding is not None and u.embedding.model == MODEL_NAME and u.embedding.dim == 384
        assert u.embedding.salience is not None and 0.0 <= u.embedding.salience <= 1.0
        assert cos(np.frombuffer(base64.b64decode(u.embedding.vector), "<f4"), vec) > 0.9999
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = 'u-cv'"
                            " AND embedding IS NOT NULL") == len(TURNS)  # the same pass, stored for search_messages
    # a redelivered message is published again, without a vector: it was scored once, when it was new
    await memory.api.record(StoredMessage(message_id="cv-2", session_id="cv", user_id="u-cv", role="human",
                                          content=TURNS[2], timestamp=now + 2))
    assert (await published(mesh))[-1].embedding is None
    assert len(memory.api.carrier.states) == 1  # the session's salience state, until the user is deleted

    carried, counts = backend(mesh)
    for u in updates:
        assert await carried.ingest(u)
    assert counts.get("ingest.carried") == len(TURNS)
    plain, plain_counts = backend(mesh)
    for u in updates:
        assert await plain.ingest(u.model_copy(update={"user_id": "u-cv-plain", "embedding": None}))
    assert plain_counts.get("ingest.carried") == 0
    await memory.api.delete_user("u-cv-gone")  # another user's deletion: this user's session state stays
    assert len(memory.api.carrier.states) == 1
    got, expected = await episodic(mesh, "u-cv"), await episodic(mesh, "u-cv-plain")
    assert set(got) == set(expected) == set(TURNS)
    for text in TURNS:
        assert cos(got[text][0], expected[text][0]) > 0.9999
        assert got[text][1] is not None and expected[text][1] is not None
        assert abs(got[text][1] - expected[text][1]) < 1e-4, (text, got[text][1], expected[text][1])
    await memory.api.delete_user("u-cv")  # the user's own deletion: no state derived from their turns stays
    assert len(memory.api.carrier.states) == 0


def update(user: str, text: str, embedding: CarriedEmbedding | None) -> MemoryUpdate:
    return MemoryUpdate(user_id=user, content=text, meta={"session_id": "s", "message_id": str(uuid.uuid4())},
                        embedding=embedding)


async def test_ltm_stores_the_carried_vector_not_one_of_its_own(mesh: Mesh) -> None:
    """The carried vector is what is stored: here, on purpose, another text's (so a recomputed vector would show)."""
    native, counts = backend(mesh)
    other = mesh.model.encode(["Penguins live in the southern hemisphere."])[0]
    assert await native.ingest(update("u-cv2", "I play the cello on Sundays.", carry(other, MODEL_NAME, 0.7)))
    stored = (await episodic(mesh, "u-cv2"))["I play the cello on Sundays."]
    assert cos(stored[0], other) > 0.9999 and stored[1] == pytest.approx(0.7)
    assert counts.get("ingest.carried") == 1


def _raw(**fields: Any) -> CarriedEmbedding:
    return CarriedEmbedding.model_construct(**{"model": MODEL_NAME, "dim": 384, "salience": 0.5, **fields})


async def test_a_vector_ltm_cannot_use_is_refused_and_the_turn_embedded_anyway(mesh: Mesh) -> None:
    """Another model's vector, a wrong size, a broken encoding, NaN, a vector not of unit length, and (with the
    salience model on) a vector without a score: each turn is ingested with ltm's own vector, the refusal counted."""
    native, counts = backend(mesh)
    good = mesh.model.encode(["something else entirely"])[0]
    nan = good.copy()
    nan[3] = np.nan
    cases = {
        "model": carry(good, "text-embedding-3-small", 0.5),
        "model ": carry(good, f"{MODEL_NAME}/int8", 0.5),
        "dim": carry(good[:100] / np.linalg.norm(good[:100]), MODEL_NAME, 0.5),
        "encoding": _raw(vector="not base64!"),
        "encoding ": _raw(vector=carry(good[:383], MODEL_NAME).vector),
        "values": carry(nan, MODEL_NAME, 0.5),
        "norm": carry(good * 2, MODEL_NAME, 0.5),
        "unscored": carry(good, MODEL_NAME, None),
    }
    texts = {reason: f"Turn number {i}: I keep {i + 2} hens in the garden." for i, reason in enumerate(cases)}
    for reason, embedding in cases.items():
        assert await native.ingest(update("u-cv3", texts[reason], embedding))
    stored = await episodic(mesh, "u-cv3")
    own = dict(zip(texts.values(), mesh.model.encode(list(texts.values())), strict=True))
    for text, (vec, salience) in stored.items():
        assert cos(vec, own[text]) > 0.9999, text  # ltm's own vector, not the carried one
        assert salience is not None and salience != 0.5  # and ltm's own score
    assert counts.get("ingest.carried") == 0
    assert {name: counts.get(f"ingest.carried_refused.{name}") for name in ("model", "dim", "encoding", "values",
                                                                             "norm")} == {
        "model": 2, "dim": 1, "encoding": 2, "values": 1, "norm": 1}
    assert counts.get("ingest.carried_unscored") == 1
    # without the salience model, a vector without a score is all ingest needs
    off, off_counts = backend(mesh, ltm_salience=False)
    assert await off.ingest(update("u-cv4", "I bake bread on Fridays.", carry(good, MODEL_NAME, None)))
    assert off_counts.get("ingest.carried") == 1


def test_an_embedding_that_is_not_one_is_a_decode_error() -> None:
    """Structure is the contract's: a vector that is not a string, a size out of range, a salience outside 0-1."""
    base = {"user_id": "u", "content": "hello"}
    for bad in ({"model": MODEL_NAME, "dim": 3, "vector": 5},
                {"model": MODEL_NAME, "dim": 0, "vector": "AAAA"},
                {"model": "", "dim": 1, "vector": "AAAA"},
                {"model": MODEL_NAME, "dim": 1, "vector": "AAAA", "salience": 1.5}):
        with pytest.raises(DecodeError):
            decode(MEMORY_UPDATE, json.dumps({**base, "embedding": bad}))
    assert decode(MEMORY_UPDATE, json.dumps({**base, "embedding": {"model": "m", "dim": 1, "vector": "AACAPw=="}}))


async def test_an_import_carries_the_same_vectors_and_salience_and_stores_them(mesh: Mesh) -> None:
    """import_messages embeds its new messages before its transaction: their updates carry the vectors and scores
    the write path gives the same turns (another user, turn by turn), the vectors are stored for search_messages,
    and importing the history again publishes nothing."""
    memory = mesh.memory()
    now = time.time()
    history = [ImportMessage(session_id="imp", role="user" if i % 2 == 0 else "assistant", content=text,
                             timestamp=now + i) for i, text in enumerate(TURNS)]
    result = await memory.api.importer.import_messages("u-imp", history)
    assert result.imported == result.updates_published == len(TURNS)
    imported = await published(mesh)
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = 'u-imp'"
                            " AND embedding IS NULL") == 0
    for i, text in enumerate(TURNS):
        await memory.api.record(StoredMessage(message_id=f"live-{i}", session_id="live", user_id="u-imp-live",
                                              role="human" if i % 2 == 0 else "ai", content=text, timestamp=now + i))
    live = (await published(mesh))[len(imported):]
    assert [u.content for u in imported] == [u.content for u in live] == TURNS
    for a, b in zip(imported, live, strict=True):
        assert a.embedding is not None and b.embedding is not None
        assert a.embedding.salience is not None and b.embedding.salience is not None
        assert abs(a.embedding.salience - b.embedding.salience) < 1e-5
        va, vb = (np.frombuffer(base64.b64decode(e.vector), "<f4") for e in (a.embedding, b.embedding))
        assert cos(va, vb) > 0.9999
    again = await memory.api.importer.import_messages("u-imp", history)
    assert again.imported == again.updates_published == 0


async def test_one_sessions_concurrent_writes_are_stored_in_the_order_they_came(mesh: Mesh) -> None:
    """The embedding pass takes the model's lock, which is not fair: without ordering, concurrent writes of one
    session reached PostgreSQL in any order (and a turn stored after newer ones had left the STM window was never
    folded into the summary). Each session's writes are embedded and stored in the order they came."""
    memory = mesh.memory(stm_max_messages=5)
    now = time.time()
    messages = [StoredMessage(message_id=f"ord-{i}", session_id="ord", user_id="u-ord", role="human",
                              content=f"Turn {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 7),
                              timestamp=now + i) for i in range(40)]
    await asyncio.gather(*(memory.api.record(m) for m in messages))
    async with mesh.pool.connection() as conn:
        cur = await conn.execute("SELECT message_id FROM conversation_messages WHERE user_id = 'u-ord'"
                                 " ORDER BY message_index")
        assert [r[0] for r in await cur.fetchall()] == [m.message_id for m in messages]
    await memory.stm.drain()
    assert (await memory.store.load_summary("u-ord", "ord")).turns == 35
    assert not memory.api._writing  # no lock left behind


async def test_a_message_that_is_not_published_is_embedded_in_the_background_not_on_the_write_path(
        mesh: Mesh) -> None:
    """An offline reply carries no vector anywhere (it is not published): the write path stores it at once, without
    the forward pass its user's turn had, and the background job gives it its vector later; the carried salience of
    the session's next published turn is the one ltm computes over the published turns alone."""
    memory = mesh.memory()
    assert memory.api.carrier is not None and memory.api.salience is None  # the defaults
    now = time.time()
    turns = [StoredMessage(message_id="bg-0", session_id="bg", user_id="u-bg", role="human", content=TURNS[2],
                           timestamp=now),
             StoredMessage(message_id="bg-1", session_id="bg", user_id="u-bg", role="ai", timestamp=now + 1,
                           content="[offline] I can only repeat what I remember: " + TURNS[2],
                           metadata={"model": OFFLINE_MODEL}),
             StoredMessage(message_id="bg-2", session_id="bg", user_id="u-bg", role="human", content=TURNS[4],
                           timestamp=now + 2)]
    for m in turns:
        await memory.api.record(m)
    vectors = "SELECT count(*) FROM conversation_messages WHERE user_id = 'u-bg' AND embedding IS NOT NULL"
    assert await mesh.count(vectors) == 2  # the two published turns, on the write path
    assert memory.metrics.get("carry.vectors") == 2
    updates = [u for u in await published(mesh) if u.user_id == "u-bg"]
    assert [u.content for u in updates] == [TURNS[2], TURNS[4]]
    await memory.api.backfill.load_background_model(memory.settings)  # MEMORY_BACKGROUND_MODEL=own, as run() does

    async def no_wait() -> None:
        return None

    assert await memory.api.embed_pending(turn=no_wait) == 1  # the reply, by the background job, on its own copy
    assert memory.api.backfill._background is not None
    assert memory.api.backfill._background.model is memory.api.backfill.background_model
    assert await mesh.count(vectors) == 3
    async with mesh.pool.connection() as conn:
        cur = await conn.execute("SELECT embedding::text FROM conversation_messages WHERE user_id = 'u-bg'"
                                 " AND message_id = 'bg-1'")
        row = await cur.fetchone()
    assert row is not None
    assert cos(np.array(json.loads(row[0]), dtype=np.float32), mesh.model.encode([turns[1].content])[0]) > 0.9999
    plain, _ = backend(mesh)  # ltm's own scores of the published turns: the same as the carried ones
    for u in updates:
        assert await plain.ingest(u.model_copy(update={"user_id": "u-bg-plain", "embedding": None}))
    expected = await episodic(mesh, "u-bg-plain")
    for u in updates:
        assert u.embedding is not None and u.embedding.salience is not None
        assert abs(u.embedding.salience - (expected[u.content][1] or 0.0)) < 1e-4


async def test_a_store_does_not_wait_for_the_model_behind_a_background_pass(mesh: Mesh) -> None:
    """MEMORY_BACKGROUND_MODEL=own: the background job's passes (offline replies, ~50 ms each for a long one) hold
    a copy of the model of their own, so a message stored meanwhile is embedded beside them, not after them."""
    memory = mesh.memory()
    write_model = (await memory._get_embedder()).model
    await memory.api.backfill.load_background_model(memory.settings)
    background = memory.api.backfill.background_embedder(await memory._get_embedder())
    assert background.model is not write_model and background.model._lock is not write_model._lock
    with background.model._lock:  # a background pass under way
        await asyncio.wait_for(memory.api.record(StoredMessage(
            message_id="bgm-0", session_id="bgm", user_id="u-bgm", role="human", content=TURNS[2],
            timestamp=time.time())), 20)
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = 'u-bgm'"
                            " AND embedding IS NOT NULL") == 1


async def test_two_copies_background_jobs_embed_each_message_once(mesh: Mesh) -> None:
    """Every memory copy's background job looks for messages without a vector, oldest first: each pass claims its
    rows until it has stored their vectors, so two copies at once embed different messages, never the same ones."""
    one, two = mesh.memory(), mesh.memory()
    now = time.time()
    for i in range(24):  # offline replies: stored without a vector, as the write path leaves them
        await one.api.record(StoredMessage(message_id=f"two-{i}", session_id=f"two-{i % 3}", user_id="u-two",
                                           role="ai", content=f"[offline] reply {i}: " + TURNS[i % len(TURNS)],
                                           timestamp=now + i, metadata={"model": OFFLINE_MODEL}))

    async def no_wait() -> None:
        return None

    done = await asyncio.gather(*(m.api.embed_pending(turn=no_wait) for m in (one, two, one, two)))
    assert sum(done) == 24, done  # each message once, whichever copy took it
    assert one.metrics.get("embedded") + two.metrics.get("embedded") == 24
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = 'u-two'"
                            " AND embedding IS NULL") == 0


async def test_a_message_the_model_refuses_is_given_up_after_three_tries_and_holds_nothing_up(mesh: Mesh) -> None:
    """A text the embedding model refuses for its own sake (an embedding server's 400, not an outage) once failed
    the background job's whole pass, every pass: the oldest rows came back each time, so no message stored after it
    was ever embedded, and it was retried forever. Now each message of a failed pass is tried alone; the refused one
    is counted on its row and given up after MAX_EMBED_FAILURES passes; the others are embedded at once."""
    from services.memory.store import MAX_EMBED_FAILURES

    memory = mesh.memory()
    real = mesh.model

    class Refusing:  # the model as an embedding server that refuses one text
        has_tokens = False
        dim, name = real.dim, real.name

        def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
            if any("POISON" in t for t in texts):
                raise ValueError("embedding server refused (400): content rejected")
            return real.encode(texts, batch_size)

    memory.api.backfill.background_model = Refusing()  # type: ignore[assignment]
    now = time.time()
    texts = ["[offline] first reply", "[offline] POISON reply", "[offline] third reply"]
    for i, text in enumerate(texts):
        await memory.api.record(StoredMessage(message_id=f"rf-{i}", session_id="rf", user_id="u-rf", role="ai",
                                              content=text, timestamp=now + i, metadata={"model": OFFLINE_MODEL}))

    async def no_wait() -> None:
        return None

    failures = "SELECT embed_failures FROM conversation_messages WHERE user_id = 'u-rf' AND message_id = 'rf-1'"
    assert await memory.api.embed_pending(turn=no_wait) == 2  # the other two, in the same call
    assert await mesh.count(failures) == MAX_EMBED_FAILURES  # tried alone once a pass, until given up
    assert memory.metrics.get("embed_failed") == MAX_EMBED_FAILURES and memory.metrics.get("embed_given_up") == 1
    await memory.api.record(StoredMessage(message_id="rf-3", session_id="rf", user_id="u-rf", role="ai",
                                          content="[offline] a later reply", timestamp=now + 3,
                                          metadata={"model": OFFLINE_MODEL}))
    assert await memory.api.embed_pending(turn=no_wait) == 1  # the later one; the refused one is not tried again
    assert await mesh.count(failures) == MAX_EMBED_FAILURES
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = 'u-rf'"
                            " AND embedding IS NULL") == 1  # stored and readable, without a vector


async def test_every_memory_copy_drops_a_deleted_users_session_states(mesh: Mesh) -> None:
    """The copy that served a deletion dropped the states derived from the user's turns; another copy that had
    stored some of them kept theirs (salience and carried-vector states, in process) until its LRU pushed them out.
    Every copy hears the deletion on memory_forget now; a malformed message there is dead-lettered."""
    serving, other = mesh.memory(), mesh.memory()
    async with running(other):
        assert other.api.carrier is not None
        now = time.time()
        for i, text in enumerate(TURNS[:2]):
            for user in ("u-gone", "u-stays"):
                await other.api.record(StoredMessage(message_id=f"{user}-{i}", session_id=f"{user}-s", user_id=user,
                                                     role="human", content=text, timestamp=now + i))
        assert len(other.api.carrier.states) == 2
        dead = mesh.names.dead(mesh.names.memory_forget)
        await mesh.redis.publish(mesh.names.memory_forget, b'{"forget": "not a list"}')
        await mesh.redis.publish(mesh.names.memory_forget, b'{"forget": ["u-gone", {"x": 1}]}')  # names the user

        async def dead_lettered() -> bool:
            return await mesh.redis.xlen(dead) == 2

        await wait_until(dead_lettered, message="both malformed messages dead-lettered")
        await serving.api.delete_user("u-gone")  # its sweep takes the dead letter that names the user

        async def dropped() -> bool:
            return len(other.api.carrier.states) == 1

        await wait_until(dropped, message=f"the other copy's states: {list(other.api.carrier.states._states)}")
        assert other.metrics.get("forget_heard") == 1
        assert await mesh.redis.xlen(dead) == 1
