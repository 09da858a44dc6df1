"""Benchmarks of the whole mesh and of long-term memory, side by side in one run.

- ``turn_ltm_on`` / ``turn_ltm_off``: one chat turn, from XADD of the user input to the AIResponse,
  with LTM recall (a user holding ``MEMORIES`` memories) and with ``ENABLE_LTM=false``; their
  ratio is what memory costs a turn (offline responder: the LLM's own time is not in it).
- ``search_bus`` / ``search_backend``: an ltm search through ``ltm_requests`` and the reply
  channel, and the same search called on the backend in process; their ratio is the bus's cost.
- ``ingest``: one MemoryUpdate through the backend (embedding, extraction, storage).

Published anchors for the search rows (see ../shared/README.md): Mem0 paper p50 148 ms / p95
200 ms; Zep Cloud p50 87 ms / p95 155 ms; an independent local mem0 run 882 ms mean.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from mesh.bench import BenchEnv, Measured, bench, timer
from services.chat_ai.config import ChatSettings
from services.chat_ai.service import ChatService
from services.ltm.config import LtmSettings
from services.ltm.service import LtmService, build_backend
from services.memory.config import MemorySettings
from services.memory.service import MemoryService
from services.memory.store import ConversationStore
from shared.contracts import (
    AI_RESPONSE,
    LTM_RESPONSE,
    LTMResponse,
    MemoryUpdate,
    Names,
    SearchRequest,
    UserInput,
    decode,
    encode,
    new_id,
)
from shared.contracts.messages import MemoryUpdateMeta, SearchData
from shared.runtime.db import open_pool
from shared.runtime.embedding import shared_model
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RpcClient
from shared.runtime.runner import redis_client

MEMORIES = 1_000
SUBJECTS = ["my sister", "my manager", "our neighbour", "my best friend", "my dentist", "the landlord", "my coach"]
VERBS = ["moved to", "started working at", "recommended", "complained about", "is learning", "bought", "visited"]
OBJECTS = ["Lisbon", "a bakery downtown", "the new Italian place", "Japanese", "an electric bike", "Kyoto",
           "the climbing gym", "a vintage camera", "the jazz festival", "a sailing course", "Porto", "the museum"]
QUESTIONS = ["Where did my sister move?", "What did my manager recommend?", "What is my best friend learning?",
             "What did the landlord complain about?", "Which city did my coach visit?", "What did our neighbour buy?"]


def sentences(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [f"Yesterday {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}, "
            f"and I think that was the {i}th time this year." for i in range(n)]


@asynccontextmanager
async def mesh(env: BenchEnv, **chat: Any) -> AsyncIterator[tuple[Any, Names, LtmService, ChatService]]:
    names = Names().with_prefix(env.key_prefix)
    redis = redis_client(env.redis_url)
    pool = await open_pool(env.database_url, max_size=10)
    common: dict[str, Any] = dict(redis_url=env.redis_url, database_url=env.database_url, openai_api_key=None,
                                  openai_base_url=None)
    settings = LtmSettings(**common)
    ltm = LtmService(settings, names, redis, build_backend(settings, pool, shared_model(), redis, names))
    memory = MemoryService(MemorySettings(**common), names, redis, ConversationStore(pool))
    chat_ai = ChatService(ChatSettings(**common, **chat), names, redis)
    tasks = [asyncio.create_task(s.run()) for s in (memory, ltm, chat_ai)]
    await asyncio.wait_for(asyncio.gather(ltm.ready.wait(), chat_ai.ready.wait()), 180)
    try:
        yield redis, names, ltm, chat_ai
    finally:
        for s in (memory, ltm, chat_ai):
            s.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pool.close()
        await redis.aclose()


async def fill(ltm: LtmService, user_id: str, n: int) -> None:
    for i, text in enumerate(sentences(n)):
        await ltm.backend.ingest(MemoryUpdate(user_id=user_id, content=text, source="user",
                                              timestamp=time.time() - (n - i) * 60,
                                              meta=MemoryUpdateMeta(session_id=f"fill-{i // 50}", message_id=f"f{i}")))


async def turn(redis: Any, names: Names, user_id: str, text: str) -> float:
    msg = UserInput(message_id=new_id(), user_id=user_id, session_id=f"bench-{new_id()[:6]}", content=text)
    last = await redis.xrevrange(names.ai_responses, count=1)
    cursor: Any = last[0][0] if last else "0-0"
    started = time.perf_counter()
    await redis.xadd(names.user_input, {"data": encode(msg)})
    while True:
        rows = await redis.xread({names.ai_responses: cursor}, block=5000, count=50)
        for _stream, entries in rows or []:
            for entry_id, fields in entries:
                cursor = entry_id
                if decode(AI_RESPONSE, fields[b"data"]).in_reply_to == msg.message_id:
                    return time.perf_counter() - started


@bench("mesh", "turns_and_search")
async def turns_and_search(env: BenchEnv) -> list[Measured]:
    on: list[float] = []
    off: list[float] = []
    bus: list[float] = []
    direct: list[float] = []
    ingest: list[float] = []
    reps = env.reps(60)
    async with mesh(env) as (redis, names, ltm, _chat):
        user = "bench-user"
        for i, text in enumerate(sentences(20, seed=11)):  # ingest cost, measured on its own
            update = MemoryUpdate(user_id="bench-ingest", content=text, source="user",
                                  meta=MemoryUpdateMeta(session_id="s", message_id=f"i{i}"))
            with timer(ingest):
                await ltm.backend.ingest(update)
        await fill(ltm, user, MEMORIES)
        client: RpcClient[LTMResponse] = RpcClient(
            redis, queue=names.ltm_requests, reply_channel=names.reply_channel(names.ltm_responses, "bench"),
            adapter=LTM_RESPONSE, metrics=Metrics())
        await client.start()
        for i in range(reps):
            data = SearchData(query=QUESTIONS[i % len(QUESTIONS)], limit=10)
            with timer(bus):
                await client.call(SearchRequest(request_id=new_id(), type="search", user_id=user, data=data), 5.0)
            with timer(direct):
                await ltm.backend.search(user, data)
        await client.close()
        for i in range(reps):
            on.append(await turn(redis, names, user, QUESTIONS[i % len(QUESTIONS)]))
    async with mesh(env, enable_ltm=False) as (redis, names, _ltm, _chat):
        for i in range(reps):
            off.append(await turn(redis, names, "bench-user", QUESTIONS[i % len(QUESTIONS)]))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    anchors = "anchors: Mem0 paper p50 148 / p95 200 ms; Zep Cloud p50 87 / p95 155 ms"
    return [
        Measured("turn_ltm_on", on, None, None,
                 f"XADD to AIResponse, offline responder, LTM recall over {MEMORIES} memories; "
                 f"p50 ratio on/off = {med(on) / med(off):.2f}"),
        Measured("turn_ltm_off", off, None, None, "the same turns with ENABLE_LTM=false"),
        Measured("search_bus", bus, None, 200, f"ltm search via ltm_requests + reply channel, limit 10, "
                 f"{MEMORIES} memories; p50 ratio bus/direct = {med(bus) / med(direct):.2f}; {anchors}"),
        Measured("search_backend", direct, None, None, "the same search called on the backend in process"),
        Measured("ingest", ingest, None, None, "one MemoryUpdate: embedding, extraction, storage"),
    ]
