"""Ranking behaviour of the native query path (services/ltm/retrieval.py) on real PostgreSQL + pgvector."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np

from services.ltm.periods import in_period, in_periods
from services.ltm.retrieval import RetrievalConfig, count_tokens, query_periods, search
from services.ltm.store import LtmStore, NewMemory
from shared.contracts import MemoryUpdate, encode
from shared.contracts.messages import MemoryUpdateMeta, SearchData
from shared.runtime.embedding import SyncEmbedder
from tests.helpers import Mesh, ask_ltm, ltm_request, running, wait_until

DAY = 86_400.0
HYBRID = RetrievalConfig()
SEED = HYBRID.with_profile("seed")


async def put(mesh: Mesh, user: str, content: str, *, type_: str = "episodic", session: str | None = None,
              ts: float | None = None, confidence: float = 1.0, uses: int = 0, speaker: str | None = None) -> str:
    vec = mesh.model.encode([content])[0]
    store = LtmStore(mesh.pool)
    m = await store.add(NewMemory(user_id=user, type=type_, content=content, embedding=vec, confidence=confidence,
                                  message_id=f"{user}:{content[:40]}", session_id=session, timestamp=ts,
                                  speaker=speaker))
    if uses:
        async with mesh.pool.connection() as conn:
            await conn.execute("UPDATE ltm_memories SET access_count = %s, last_accessed = now()"
                               " WHERE user_id = %s AND memory_id = %s", (uses, user, m.memory_id))
    return m.memory_id


async def ask(mesh: Mesh, user: str, query: str, cfg: RetrievalConfig = HYBRID, **data: object) -> list:  # type: ignore[type-arg]
    vec = mesh.model.encode([query])[0]
    return await search(mesh.pool, user, SearchData(query=query, **data), vec, cfg)  # type: ignore[arg-type]


async def test_boosts_never_pull_in_an_unrelated_memory(mesh: Mesh) -> None:
    now = time.time()
    dog = await put(mesh, "u1", "We adopted a beagle dog called Rex last spring.", ts=now - 400 * DAY, confidence=0.5)
    tax = await put(mesh, "u1", "The quarterly invoice for the accountant is overdue.", ts=now, uses=500)
    for cfg in (HYBRID, SEED):
        found = [m.memory_id for m in await ask(mesh, "u1", "What is the name of our dog?", cfg)]
        assert found == [dog], cfg.profile.name
    # the gate is what keeps it out: opened, the seed weights (recency, access, confidence) rank it first
    opened = replace(SEED, min_similarity=-1.0)
    found = [m.memory_id for m in await ask(mesh, "u1", "What is the name of our dog?", opened)]
    assert found[0] == tax and dog in found


async def test_seed_profile_scores_with_the_documented_weights(mesh: Mesh) -> None:
    now = time.time()
    old = await put(mesh, "u1", "I play the cello in a community orchestra.", ts=now - 60 * DAY, confidence=0.9)
    new = await put(mesh, "u1", "My cello teacher says my playing improved.", ts=now - 1 * DAY, uses=3)
    hybrid = await ask(mesh, "u1", "Which instrument do I play in an orchestra?", HYBRID)
    assert [m.memory_id for m in hybrid] == [old, new]  # relevance first
    seed = await ask(mesh, "u1", "Which instrument do I play in an orchestra?", SEED)
    assert [m.memory_id for m in seed] == [new, old]  # recency and use win once both are relevant
    most_uses = max(m.access_count for m in seed)
    for m in seed:
        assert m.source.timestamp is not None
        recency = 2 ** (-(now - m.source.timestamp) / DAY / SEED.half_life_days)
        access = math.log1p(m.access_count) / math.log1p(most_uses)
        expected = 0.4 * m.similarity + 0.3 * recency + 0.2 * access + 0.1 * m.confidence
        assert abs(m.score - expected) < 1e-3


async def test_keyword_match_finds_what_the_embedding_misses(mesh: Mesh) -> None:
    await put(mesh, "u1", "Melanie: I finally booked the trip, we fly to Reykjavik in June!", session="s1", ts=1.0,
              speaker="Melanie")
    for i in range(30):
        await put(mesh, "u1", f"Melanie: travelling is always fun, holiday number {i} was great", session="s2",
                  ts=10.0 + i, speaker="Melanie")
    found = await ask(mesh, "u1", "Where is Melanie flying to, Reykjavik?", limit=1)
    assert "Reykjavik" in found[0].content


async def test_threshold_and_types_filters(mesh: Mesh) -> None:
    await put(mesh, "u1", "I prefer green tea over coffee.", type_="preference")
    await put(mesh, "u1", "Green tea was served at the meeting.", type_="episodic")
    prefs = await ask(mesh, "u1", "Do I like green tea?", types=["preference"])
    assert [m.type for m in prefs] == ["preference"]
    both = await ask(mesh, "u1", "Do I like green tea?")
    assert {m.type for m in both} == {"preference", "episodic"}
    cut = max(m.similarity for m in both) - 1e-6
    high = await ask(mesh, "u1", "Do I like green tea?", threshold=cut)
    assert len(high) == 1 and high[0].similarity >= cut


async def test_results_never_cross_users(mesh: Mesh) -> None:
    await put(mesh, "alice", "My locker code is 4417.", session="s", ts=1.0)
    await put(mesh, "bob", "My locker code is 9902.", session="s", ts=2.0)
    await put(mesh, "bob", "Bob: the gym is closed on Sunday.", session="s", ts=3.0)
    found = await ask(mesh, "alice", "What is my locker code?")
    assert [m.content for m in found] == ["My locker code is 4417."]
    assert found[0].context == []  # bob's turns share the session name but are not alice's context
    assert await ask(mesh, "carol", "What is my locker code?") == []


async def test_neighbouring_turns_come_as_context_within_the_token_budget(mesh: Mesh) -> None:
    turns = ["Ann: How was the weekend?", "Ben: Busy, I helped my sister move house.",
             "Ann: Where did she move to?", "Ben: She moved to a flat in Porto, near the river.",
             "Ann: Lovely, is it big?", "Ben: Two bedrooms and a balcony.", "Ann: Nice."]
    for i, text in enumerate(turns):
        await put(mesh, "u1", text, session="s1", ts=1000.0 + i)
    await put(mesh, "u1", "Ann: Porto trip photos from another day.", session="s2", ts=5000.0)
    found = await ask(mesh, "u1", "Did Ben's sister move to a flat in Porto?", limit=1)
    assert found[0].content == turns[3]
    context = [c.content for c in found[0].context]
    assert context == [t for t in turns if t in context]  # chronological
    assert {turns[2], turns[4]} <= set(context) and turns[3] not in context
    assert all(c.startswith(("Ann:", "Ben:")) and "Porto trip" not in c for c in context)
    # every returned turn carries its token count, so chat_ai's prompt need not tokenize it again
    counted = [found[0], *found[0].context]
    assert [t.tokens for t in counted] == count_tokens([t.content for t in counted])
    # a smaller budget: fewer context turns, and everything returned fits in it
    budget = sum(count_tokens([turns[3], turns[2], turns[4]]))
    small = await ask(mesh, "u1", "Did Ben's sister move to a flat in Porto?", replace(HYBRID, max_tokens=budget),
                      limit=1)
    returned = [small[0].content, *(c.content for c in small[0].context)]
    assert sum(count_tokens(returned)) <= budget and 1 <= len(small[0].context) < len(context)
    # context off
    bare = await ask(mesh, "u1", "Did Ben's sister move to a flat in Porto?", replace(HYBRID, context_turns=0),
                     limit=1)
    assert bare[0].context == []


async def test_access_statistics_are_flushed_in_one_write(mesh: Mesh) -> None:
    mid = await put(mesh, "u1", "My bike is a red Bianchi.")
    store = LtmStore(mesh.pool)
    vec = mesh.model.encode(["What bike do I have?"])[0]
    for _ in range(3):
        found = await store.search("u1", SearchData(query="What bike do I have?"), vec, HYBRID)
        assert [m.memory_id for m in found] == [mid]
    sql = "SELECT access_count FROM ltm_memories WHERE user_id = %s AND memory_id = %s"
    assert await mesh.count(sql, "u1", mid) == 0  # nothing written on the hot path
    assert await store.flush_access() == 1  # one statement for the batch
    assert await mesh.count(sql, "u1", mid) == 3


async def _search_over_bus(mesh: Mesh, user: str, query: str) -> list:  # type: ignore[type-arg]
    resp = await ask_ltm(mesh, ltm_request("search", user, {"query": query, "limit": 3}))
    assert resp.success
    return list(resp.memories)


async def test_search_through_the_bus_returns_turns_with_speaker_and_context(mesh: Mesh,
                                                                             sync_embedder: SyncEmbedder) -> None:
    turns = [("Caroline", "I went to a support group yesterday."), ("Melanie", "How did it feel?"),
             ("Caroline", "It was powerful, I felt accepted."), ("Melanie", "I painted a sunrise by the lake.")]
    async with running(mesh.ltm()):
        for i, (speaker, text) in enumerate(turns):
            update = MemoryUpdate(user_id="u-bus", content=f"{speaker}: {text}", timestamp=1_683_550_000.0 + i,
                                  meta=MemoryUpdateMeta.model_validate({"session_id": "c:s1", "message_id": f"m{i}",
                                                                        "speaker": speaker}))
            await mesh.redis.xadd(mesh.names.memory_updates, {"data": encode(update)})
        await wait_until(lambda: _ingested(mesh, "u-bus", len(turns)), message="turns ingested")
        found = await _search_over_bus(mesh, "u-bus", "What did Melanie paint?")
    top = found[0]
    assert top.source.message_id == "m3" and top.source.speaker == "Melanie"
    assert top.source.session_id == "c:s1" and top.source.timestamp == 1_683_550_003.0
    assert [c.message_id for c in top.context][-1] == "m2"  # the turn before it


async def _ingested(mesh: Mesh, user: str, n: int) -> bool:
    return await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id = %s", user) >= n


def test_query_periods_name_days_months_and_years() -> None:
    assert query_periods("What did Tim read on 8th December, 2023?") == [(2023, 12, 8)]
    assert query_periods("What did she paint on October 13, 2023 and in May 2022?") == [(2023, 10, 13),
                                                                                       (2022, 5, None)]
    assert query_periods("Where did we go in August?") == [(None, 8, None)]
    assert query_periods("What happened in 2021?") == [(2021, None, None)]
    assert query_periods("May I ask where you live?") == []
    assert query_periods("On 45 May, 2023") == [(2023, 5, None)]  # no such day: the month is still named
    day = datetime(2023, 12, 8, 13, 56, tzinfo=UTC).timestamp()
    assert in_period(day, [(2023, 12, 8)]) and in_period(day + DAY, [(2023, 12, 8)])
    assert not in_period(day + 5 * DAY, [(2023, 12, 8)]) and in_period(day, [(None, 12, None)])
    assert not in_period(day, [(2022, None, None)]) and not in_period(None, [(2023, 12, 8)])


def test_in_periods_agrees_with_in_period_on_every_time() -> None:
    """The vectorised test a search runs over its candidates gives what the per-memory one gives: days +-2 days,
    months and years, open parts, impossible dates, times before 1970, at boundaries and with no time (NaN)."""
    rng = np.random.default_rng(7)
    edges = [datetime(y, m, 1, tzinfo=UTC).timestamp() + s for y in (1969, 2000, 2023, 2024) for m in (1, 2, 3, 12)
             for s in (-1.5, -0.25, 0.0, 0.25)]
    named = datetime(2023, 12, 8, tzinfo=UTC).timestamp()
    ts = np.array([*rng.uniform(-5e8, 2e9, 2000), *edges, named + 2 * DAY, named - 2 * DAY, named + 2 * DAY + 0.5,
                   math.nan])
    for periods in ([(2023, 12, 8)], [(None, 2, None)], [(2024, None, None)], [(2023, 2, 30), (1969, 12, None)],
                    [(None, 12, 8)], [(2000, 1, 1), (2024, 3, None), (None, None, None)], []):
        want = [False if math.isnan(t) else in_period(t, periods) for t in ts.tolist()]
        assert in_periods(ts, periods).tolist() == want, periods


async def test_a_date_in_the_query_prefers_memories_of_that_time(mesh: Mesh) -> None:
    may = datetime(2022, 5, 3, 14, 0, tzinfo=UTC).timestamp()
    june = datetime(2022, 6, 20, 14, 0, tzinfo=UTC).timestamp()
    early = await put(mesh, "u1", "Nate: I baked a lemon cake for the party.", session="s1", ts=may)
    late = await put(mesh, "u1", "Nate: I baked a chocolate cake for my friends.", session="s2", ts=june)
    undated = [m.memory_id for m in await ask(mesh, "u1", "What cake did Nate bake?")]
    assert set(undated) == {early, late}
    for query, first in (("What cake did Nate bake on 20 June, 2022?", late),
                         ("What cake did Nate bake in May 2022?", early)):
        assert (await ask(mesh, "u1", query))[0].memory_id == first, query


async def test_a_superseded_memory_ranks_below_the_current_one_and_stays_visible(mesh: Mesh) -> None:
    old = await put(mesh, "u1", "I live in Berlin, in a flat near the river.")
    new = await put(mesh, "u1", "I live in Lisbon now.")
    async with mesh.pool.connection() as conn:
        await conn.execute("UPDATE ltm_memories SET valid_to = %s, superseded_by = %s"
                           " WHERE user_id = %s AND memory_id = %s", (time.time(), new, "u1", old))
    for cfg in (HYBRID, SEED):
        found = await ask(mesh, "u1", "Where do I live? I live in Berlin?", cfg)
        assert [m.memory_id for m in found] == [new, old], cfg.profile.name
        assert found[1].valid_to is not None and found[1].superseded_by == new and found[0].valid_to is None
