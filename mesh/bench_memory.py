"""The memory service's requests through ``memory_requests`` (issue 3's operations, at a long session).

Run on the chat workload's mesh (mesh/bench_mesh.py), so the memory process is a separate process and
every stored message also flows on to ltm as a MemoryUpdate, as in use. Round trips are the client's:
RPUSH of the request to the reply on the private reply channel. Seed ceilings and aims from issue 3:
create < 500 ms, store < 200 ms (aim p95 <= 5 ms), retrieval < 2 s, context merge < 1 s, rehydration
< 5 s (aim <= 100 ms). Rehydration: the session's STM keys are deleted (what FLUSHALL or eviction does
to it), then ``get_stm`` rebuilds them from PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from mesh.bench_procs import ServiceProcess, latency, rpc, say
from mesh.bench_spec import Ctx
from shared.contracts import MEMORY_RESPONSE, Names, new_id
from shared.contracts.memory_api import (
    CreateSessionData,
    CreateSessionRequest,
    GetContextData,
    GetContextRequest,
    GetMessagesData,
    GetMessagesRequest,
    GetStmRequest,
    SessionRef,
    StoreContextData,
    StoreContextRequest,
    StoreMessageData,
    StoreMessageRequest,
)

TOPICS = ("our trip to Kyoto in April", "the garden beds and tomatoes", "the Rust rewrite of the billing service",
          "my sister Maria's wedding in Porto", "the budget for 2025", "training for the Lisbon half marathon")
# operation -> (seed ceiling ms, aim ms)
LIMITS: dict[str, tuple[float | None, float | None]] = {
    "session_create": (500, None), "message_store": (200, 5), "message_store_first_turns": (200, 5),
    "conversation_retrieval": (2000, None), "context_merge": (1000, None), "rehydration": (5000, 100),
}


def _text(i: int) -> str:
    return (f"Message {i}: let's talk about {TOPICS[i % len(TOPICS)]}. I think we should decide by Friday, "
            f"and keep notes so that we remember what we agreed on.")


async def memory_requests(ctx: Ctx, names: Names, procs: list[ServiceProcess]) -> list[dict[str, Any]]:
    spec = ctx.spec
    user, session = f"bench-memory-{ctx.run_id}", f"bench-memory-{ctx.run_id}-long"
    client = await rpc(ctx.redis, names.memory_requests, MEMORY_RESPONSE, names.prefix)
    timed: dict[str, list[float]] = {k: [] for k in LIMITS}
    base = time.time() - 10 * (spec.memory_turns + spec.memory_reps)

    async def call(op: str | None, request: Any, check: Callable[[dict[str, Any]], bool] | None = None) -> None:
        started = time.perf_counter()
        reply = await client.call(request, 30.0)
        elapsed = time.perf_counter() - started
        if not reply.success or (check is not None and not check(reply.data or {})):
            raise RuntimeError(f"memory {request.type} failed: {reply.error or reply.data}")
        if op is not None:
            timed[op].append(elapsed)

    def store(i: int) -> StoreMessageRequest:
        return StoreMessageRequest(request_id=new_id(), type="store_message", user_id=user, data=StoreMessageData(
            session_id=session, content=_text(i), role="human" if i % 2 == 0 else "ai",
            message_id=f"{session}-{i}", timestamp=base + i))

    async def repeat(make: Callable[[int], Awaitable[None]]) -> None:
        for n in range(spec.memory_reps):
            await make(n)

    say(f"memory: requests through memory_requests, a session of {spec.memory_turns} turns")
    try:
        await call(None, CreateSessionRequest(request_id=new_id(), type="create_session", user_id=user,
                                              data=CreateSessionData(session_id=session, name="long")))
        for i in range(spec.memory_turns):
            await call("message_store_first_turns", store(i))
        await repeat(lambda n: call("session_create", CreateSessionRequest(
            request_id=new_id(), type="create_session", user_id=user,
            data=CreateSessionData(session_id=f"{session}-new-{n}", name="bench", metadata={"n": n}))))
        await repeat(lambda n: call("message_store", store(spec.memory_turns + n)))
        await repeat(lambda n: call("conversation_retrieval", GetMessagesRequest(
            request_id=new_id(), type="get_messages", user_id=user,
            data=GetMessagesData(session_id=session, limit=spec.memory_turns)),
            lambda d: len(d.get("messages", [])) == spec.memory_turns))

        async def merge(n: int) -> None:
            started = time.perf_counter()
            await call(None, StoreContextRequest(request_id=new_id(), type="store_context", user_id=user,
                                                 data=StoreContextData(session_id=session, context_type="project",
                                                                       key="plan", value={f"k{n % 50}": n, "last": n})))
            await call(None, GetContextRequest(request_id=new_id(), type="get_context", user_id=user,
                                               data=GetContextData(session_id=session, context_type="project")),
                       lambda d: d["context"][0]["value"]["last"] == n)
            timed["context_merge"].append(time.perf_counter() - started)

        await repeat(merge)

        async def rehydrate(n: int) -> None:
            await ctx.redis.delete(names.stm_turns(session), names.stm_summary(session), names.stm_meta(session))
            await call("rehydration", GetStmRequest(request_id=new_id(), type="get_stm", user_id=user,
                                                    data=SessionRef(session_id=session)),
                       lambda d: bool(d["stm"]["rehydrated"]) and bool(d["stm"]["turns"]))

        await repeat(rehydrate)
        for p in procs:
            p.check()
    finally:
        await client.close()  # the caller removes the user once ltm has stopped ingesting its messages
    rows = []
    for op, samples in timed.items():
        ceiling, aim = LIMITS[op]
        r = {"operation": op, **latency(samples), "ceiling_ms": ceiling, "aim_ms": aim}
        r["pass"] = ceiling is None or (r["p95_ms"] is not None and r["p95_ms"] <= ceiling)
        r["aim_met"] = None if aim is None or r["p95_ms"] is None else r["p95_ms"] <= aim
        rows.append(r)
        say(f"  {op}: p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms (ceiling {ceiling}, aim {aim})")
    return rows
