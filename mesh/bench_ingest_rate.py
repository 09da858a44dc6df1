"""Ingest rate with extraction on: updates per second of 1 and 2 ltm processes, short and long turns.

For each number of processes, that many ltm processes start on a prefix of their own; when each
answers ``ping``, the updates are ``XADD``-ed to ``memory_updates`` in one pipeline, and the time runs
until the ``ltm`` group has delivered and acknowledged all of them (or ``ingest_timebox_s`` passed:
then the rate is what was acknowledged so far, and the report says so).

- ``short``: LoCoMo's turns in order (``"<speaker>: <text>"``, meta speaker and session; a user per
  conversation), about 130 characters each;
- ``long``: LongMemEval_S haystack turns in order, user turns (source ``user``) and assistant turns
  (source ``ai``), a user per question, about 1,000 characters each.

The updates are what the memory service publishes: each carries its turn's vector and salience
(``embedding``, MEMORY_CARRY_VECTORS: memory embeds a message as it stores it, services/memory/carry.py),
computed here by memory's own code before the clock starts, so ltm does not embed the turns. One more
measurement per kind, one process, sends the same updates without a vector (a publisher that embeds
nothing; ltm's rate before vectors were carried): ``<kind>.uncarried``.

Users are new for every measurement (nothing is skipped as already ingested) and removed afterwards.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mesh.bench_cpu import CpuMeter
from mesh.bench_procs import ServiceProcess, say, wait_consumed
from mesh.bench_search import start_ltm
from mesh.bench_seed import IngestTurn, delete_users
from mesh.bench_spec import Ctx
from shared.contracts import MemoryUpdate, Names, encode
from shared.contracts.messages import CarriedEmbedding, MemoryUpdateMeta
from shared.runtime.metrics import Metrics


def updates(turns: list[IngestTurn], tag: str, carried: list[CarriedEmbedding] | None = None) -> list[MemoryUpdate]:
    out = []
    for i, t in enumerate(turns):
        user = f"{tag}-{t.conversation}"
        meta: dict[str, Any] = {"session_id": f"{user}:{t.session}", "message_id": f"{user}:{i}"}
        if t.source == "user" and t.speaker not in ("user", "ai"):
            meta["speaker"] = t.speaker
        out.append(MemoryUpdate(user_id=user, content=t.content, source="ai" if t.source == "ai" else "user",
                                timestamp=t.timestamp, meta=MemoryUpdateMeta.model_validate(meta),
                                embedding=carried[i] if carried else None))
    return out


async def carried_vectors(turns: list[IngestTurn]) -> list[CarriedEmbedding]:
    """Each turn's ``embedding`` as memory computes it (services/memory/carry.py, its sessions in order)."""
    from services.memory.carry import Carrier
    from services.memory.store import StoredMessage
    from shared.runtime.embedding import Embedder, shared_model

    embedder = Embedder(await asyncio.to_thread(shared_model))

    async def get() -> Embedder:
        return embedder

    carrier, out = Carrier(get, Metrics()), []
    for i, t in enumerate(turns):
        m = StoredMessage(message_id=str(i), session_id=f"{t.conversation}:{t.session}", user_id=str(t.conversation),
                          role="ai" if t.source == "ai" else "human", content=t.content, timestamp=t.timestamp)
        embedded = await carrier.embed(m)
        if embedded is None:
            raise RuntimeError("embedding a bench turn failed")
        out.append(carrier.carried(m, embedded))
    return out


async def ingest_workload(ctx: Ctx) -> dict[str, Any]:
    spec = ctx.spec
    kinds = {"short": ctx.corpus.short_turns[:spec.ingest_short], "long": ctx.corpus.long_turns[:spec.ingest_long]}
    out: dict[str, Any] = {k: {"updates": len(v), "chars_per_update": round(sum(len(t.content) for t in v)
                                                                            / max(1, len(v)), 1)}
                           for k, v in kinds.items()}
    say("ingest: ltm processes ingesting a backlog of memory_updates, extraction on")
    started = time.perf_counter()
    vectors = {kind: await carried_vectors(turns) for kind, turns in kinds.items()}
    say(f"  the updates' vectors, as memory computes them: {time.perf_counter() - started:.1f}s")
    try:
        for n in (*spec.ingest_processes, 0):  # 0: one process, updates without a vector
            procs: list[ServiceProcess] = []
            names = Names()
            used: list[Names] = []
            for kind, turns in kinds.items():
                if not procs:
                    names = Names().with_prefix(ctx.prefix(f"ingest-{n}-{kind}"))
                    used.append(names)
                    procs = [(await start_ltm(ctx, f"ingest{n}", names))[0] for _ in range(max(1, n))]
                batch = updates(turns, f"bench-ingest-{ctx.run_id}-{n}-{kind}", vectors[kind] if n else None)
                meter = await CpuMeter.of(procs, ctx.redis, ctx.database_url)
                meter.start()
                wall = time.perf_counter()
                async with ctx.redis.pipeline(transaction=False) as pipe:
                    for u in batch:
                        pipe.xadd(names.memory_updates, {"data": encode(u)})
                    ids = await pipe.execute()
                done, seconds = await wait_consumed(ctx.redis, names.memory_updates, names.ltm_group, ids, procs,
                                                    timeout=spec.ingest_timebox_s, label=f"{kind} x{n}")
                cpu = meter.stop(time.perf_counter() - wall, done, "update")
                rate = done / seconds if seconds else 0.0
                out[kind][str(n) if n else "uncarried"] = {
                    "processes": max(1, n), "ingested": done, "of": len(ids), "seconds": round(seconds, 2),
                    "per_s": round(rate, 2), "per_s_per_process": round(rate / max(1, n), 2),
                    "timeboxed": done < len(ids), "vectors_carried": bool(n), "cpu": cpu}
                say(f"  {kind} turns, {max(1, n)} ltm process(es){'' if n else ', no vectors carried'}: "
                    f"{done}/{len(ids)} in {seconds:.1f}s = {rate:.1f}/s"
                    + (" (time box reached)" if done < len(ids) else "")
                    + "; cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu["cores"].items()))
                if done < len(ids):  # a backlog is left: the next measurement gets fresh processes
                    ctx.procs.stop(procs)
                    procs = []
            ctx.procs.stop(procs)  # each flushed its counters as it stopped: how many carried vectors ltm used
            out.setdefault("vectors_used", {})[str(n) if n else "uncarried"] = sum(
                [int(await ctx.redis.hget(u.metrics("ltm"), "ingest.carried") or 0) for u in used])
    finally:
        await delete_users(ctx.database_url, f"bench-ingest-{ctx.run_id}-%")
    for kind in kinds:
        one, two = out[kind].get("1", {}).get("per_s"), out[kind].get("2", {}).get("per_s")
        out[kind]["scale_2"] = round(two / one, 3) if one and two else None
    return out
