"""Ingest throughput of ltm processes, and search latency while they ingest flat out.

``python -m mesh.bench_ingest [--workload locomo|longmemeval] [--updates N] [--workers 1,2] [--search]``

Each measurement runs ``services.ltm`` as separate OS processes (``python -m services.ltm``, the bench's
:class:`mesh.bench_procs.Processes`) on a key prefix of its own, waits until each has joined the ``ltm`` group,
then ``XADD``s N :class:`MemoryUpdate`s to ``memory_updates`` in one pipeline and times until the group has
delivered and acknowledged all of them (lag 0, pending 0). rate = N / that time.

- ``locomo``: the turns of LoCoMo's dev split in order, content ``"<speaker>: <text>"`` with meta speaker,
  session and dia id, one user per conversation (as mesh/eval_locomo.py sends them): short turns.
- ``longmemeval``: the haystack turns of LongMemEval_S's dev split in order, user turns with source ``user``
  and assistant turns with source ``ai``, one user per question: long user-assistant turns.

Users get a fresh suffix per measurement, so nothing is deduplicated away between runs.

``search_under_ingest`` measures one requester's ltm ``search`` round trips (through ``ltm_requests``) against
a user that already holds memories, first on a quiet mesh and then while the same process ingests a backlog:
the ratio of the p95s is ``search_p95_ratio_ingesting``.

The bench harness calls :func:`ingest_rate` and :func:`search_under_ingest` (async; Redis and PostgreSQL URLs
in, a dict of figures out); the command line starts embedded Redis and PostgreSQL (mesh/eval_locomo.py
``stores()``) unless ``REDIS_URL`` and ``DATABASE_URL`` are set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.contracts import MemoryUpdate, Names, encode, new_id
from shared.contracts.messages import MemoryUpdateMeta

LOCOMO = Path("/work/shared/data/locomo/locomo10-dev.json")
LONGMEMEVAL = Path("/work/shared/data/longmemeval/longmemeval-s-dev.json")
WORKLOADS = ("locomo", "longmemeval")
MIGRATIONS = Path(__file__).resolve().parent.parent / "services" / "ltm" / "migrations"


# --------------------------------------------------------------------------- data
def locomo_updates(n: int, path: Path = LOCOMO, tag: str = "") -> list[MemoryUpdate]:
    """The first ``n`` LoCoMo turns, as mesh/eval_locomo.py sends them (one user per conversation)."""
    from mesh.eval_locomo import load

    out: list[MemoryUpdate] = []
    for conv in load(path):
        for t in conv.turns:
            if len(out) >= n:
                return out
            out.append(MemoryUpdate(
                user_id=f"bench-locomo-{conv.sample_id}{tag}", content=t.content, source="user",
                timestamp=t.timestamp, meta=MemoryUpdateMeta.model_validate({
                    "session_id": f"{t.session_id}{tag}", "message_id": f"{t.message_id}{tag}",
                    "speaker": t.speaker, "dia_id": t.dia_id})))
    return out


def longmemeval_updates(n: int, path: Path = LONGMEMEVAL, tag: str = "") -> list[MemoryUpdate]:
    """The first ``n`` haystack turns of LongMemEval (user turns source ``user``, assistant turns ``ai``)."""
    from mesh.eval_longmemeval import load

    out: list[MemoryUpdate] = []
    for q in load(path):
        for t in q.turns:
            if len(out) >= n:
                return out
            user = f"bench-lme-{q.question_id}{tag}"
            out.append(MemoryUpdate(
                user_id=user, content=t.content, source="user" if t.role == "user" else "ai",
                timestamp=t.timestamp, meta=MemoryUpdateMeta.model_validate({
                    "session_id": f"{user}:{t.session_key}", "message_id": f"{user}:{t.session_key}:{t.index}"})))
    return out


def updates_for(workload: str, n: int, tag: str = "") -> list[MemoryUpdate]:
    if workload == "locomo":
        return locomo_updates(n, tag=tag)
    if workload == "longmemeval":
        return longmemeval_updates(n, tag=tag)
    raise ValueError(f"workload must be one of {WORKLOADS}, not {workload!r}")


# --------------------------------------------------------------------------- measurements
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far; 0 when it cannot be read (not Linux).

    On a machine shared with other work the wall-clock rate is noisy; the CPU an ltm process spends per update
    is a steadier figure of its own cost."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


async def _start_ltm(procs: Any, workers: int, workload: str, prefix: str, env: dict[str, str]) -> list[Any]:
    """``workers`` ltm processes, each answering ``ping`` (models loaded, ingest loop running)."""
    import redis.asyncio as aioredis

    from mesh.bench_procs import ping_ready

    names = Names.from_env().with_prefix(prefix)
    started = [procs.start("ltm", workload, prefix, **env) for _ in range(workers)]
    redis = aioredis.from_url(procs.redis_url)
    try:
        for p in started:
            await ping_ready(redis, names.ltm_requests, p)
    finally:
        await redis.aclose()
    return started


async def ingest_rate(redis_url: str, database_url: str, *, workload: str = "locomo", updates: int = 1000,
                      workers: int = 1, run_dir: Path | None = None, env: dict[str, str] | None = None,
                      timeout: float = 1800.0) -> dict[str, Any]:
    """Updates per second that ``workers`` ltm processes ingest (extraction on): see the module docstring."""
    import redis.asyncio as aioredis

    from mesh.bench_procs import Processes, say, wait_consumed

    run = new_id()[:8]
    prefix = f"bench-ingest:{run}:"
    names = Names.from_env().with_prefix(prefix)
    batch = updates_for(workload, updates, tag=f"-{run}")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        base = run_dir or Path(tmp)
        procs = Processes(base, base / "data", redis_url, database_url)
        redis = aioredis.from_url(redis_url)
        try:
            started = await _start_ltm(procs, workers, workload, prefix, {"LOG_LEVEL": "WARNING", **(env or {})})
            cpu0 = sum(cpu_seconds(p.pid) for p in started)
            t0 = time.monotonic()
            async with redis.pipeline(transaction=False) as pipe:
                for u in batch:
                    pipe.xadd(names.memory_updates, {"data": encode(u)})
                ids = await pipe.execute()
            done, seconds = await wait_consumed(redis, names.memory_updates, names.ltm_group, ids, started,
                                                timeout=timeout, label=f"{workload} x{workers}")
            seconds = time.monotonic() - t0
            cpu = sum(cpu_seconds(p.pid) for p in started) - cpu0
        finally:
            procs.stop_all()
            await _cleanup(redis, prefix)
            await redis.aclose()
    rate = done / seconds if seconds else 0.0
    say(f"ingest {workload} x{workers}: {done}/{len(batch)} in {seconds:.1f}s = {rate:.1f}/s, "
        f"ltm CPU {1000 * cpu / max(1, done):.1f} ms per update")
    return {"workload": workload, "workers": workers, "updates": len(batch), "ingested": done,
            "seconds": round(seconds, 2), "per_s": round(rate, 2),
            "ltm_cpu_ms_per_update": round(1000 * cpu / max(1, done), 2),
            "chars_per_update": round(sum(len(u.content) for u in batch) / max(1, len(batch)), 1)}


async def search_under_ingest(redis_url: str, database_url: str, *, workload: str = "longmemeval",
                              seed_updates: int = 300, backlog: int = 600, searches: int = 300,
                              run_dir: Path | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One requester's search p50/p95 on a quiet ltm, then while that ltm ingests a backlog; their ratio."""
    import redis.asyncio as aioredis

    from mesh.bench_procs import REPLY, Processes, latency, rpc, say, wait_consumed
    from shared.contracts.messages import SearchData, SearchRequest

    run = new_id()[:8]
    prefix = f"bench-ingest:{run}:"
    names = Names.from_env().with_prefix(prefix)
    seed = updates_for(workload, seed_updates, tag=f"-{run}")
    user = seed[0].user_id
    seed = [u for u in seed if u.user_id == user]
    load = updates_for(workload, backlog, tag=f"-{run}-load")
    # distinct queries (no query embedding cache hit): user turns of other users, cut to a question's length
    pool = updates_for(workload, seed_updates + backlog + 40 * searches, tag="-q")[seed_updates + backlog:]
    queries = list(dict.fromkeys(u.content[:160] for u in pool if u.source == "user"))[:2 * searches + 5]
    if len(queries) < 2 * searches + 5:
        raise ValueError(f"not enough distinct {workload} user turns for {searches} searches")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        base = run_dir or Path(tmp)
        procs = Processes(base, base / "data", redis_url, database_url)
        redis = aioredis.from_url(redis_url)
        client = None
        try:
            started = await _start_ltm(procs, 1, workload, prefix, {"LOG_LEVEL": "WARNING", **(env or {})})
            ids = [await redis.xadd(names.memory_updates, {"data": encode(u)}) for u in seed]
            await wait_consumed(redis, names.memory_updates, names.ltm_group, ids, started, timeout=1800,
                                label="seed")
            client = await rpc(redis, names.ltm_requests, REPLY, prefix)

            async def one(i: int) -> float:
                t = time.perf_counter()
                r = await client.call(SearchRequest(request_id=new_id(), type="search", user_id=user,
                                                    data=SearchData(query=queries[i], limit=10)), 30)
                if not r.success:
                    raise RuntimeError(f"search failed: {r}")
                return time.perf_counter() - t

            for i in range(5):
                await one(searches * 2 + i)  # warm
            quiet = [await one(i) for i in range(searches)]
            async with redis.pipeline(transaction=False) as pipe:
                for u in load:
                    pipe.xadd(names.memory_updates, {"data": encode(u)})
                load_ids = await pipe.execute()
            busy: list[float] = []
            t0 = time.monotonic()
            while len(busy) < searches:
                busy.append(await one(searches + len(busy)))
            ingested_meanwhile = await _consumed(redis, names, load_ids)
            busy_s = time.monotonic() - t0
            await wait_consumed(redis, names.memory_updates, names.ltm_group, load_ids, started, timeout=1800,
                                label="backlog")
        finally:
            if client is not None:
                await client.close()
            procs.stop_all()
            await _cleanup(redis, prefix)
            await redis.aclose()
    q, b = latency(quiet), latency(busy)
    ratio = round(b["p95_ms"] / q["p95_ms"], 2) if q["p95_ms"] else None
    say(f"search quiet p95 {q['p95_ms']} ms, ingesting p95 {b['p95_ms']} ms (x{ratio}); "
        f"{ingested_meanwhile} updates ingested during the {busy_s:.1f}s of busy searches")
    return {"workload": workload, "quiet": q, "ingesting": b, "search_p95_ratio_ingesting": ratio,
            "ingested_during_searches": ingested_meanwhile, "busy_seconds": round(busy_s, 2)}


async def _consumed(redis: Any, names: Names, ids: list[Any]) -> int:
    from mesh.bench_procs import consumed

    return await consumed(redis, names.memory_updates, names.ltm_group, ids)


async def _cleanup(redis: Any, prefix: str) -> None:
    keys = [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await redis.delete(*keys)


# --------------------------------------------------------------------------- command line
async def _main(args: argparse.Namespace) -> dict[str, Any]:
    from mesh.eval_locomo import stores

    env = dict(kv.split("=", 1) for kv in args.env)
    results: dict[str, Any] = {"ingest": []}
    with stores() as (redis_url, database_url):
        os.environ.setdefault("REDIS_URL", redis_url)
        os.environ.setdefault("DATABASE_URL", database_url)
        from shared.runtime.db import migrate

        await migrate(database_url, "ltm", MIGRATIONS)
        for workers in args.workers:
            results["ingest"].append(await ingest_rate(redis_url, database_url, workload=args.workload,
                                                       updates=args.updates, workers=workers, env=env,
                                                       run_dir=args.run_dir))
        rates = {r["workers"]: r["per_s"] for r in results["ingest"]}
        if 1 in rates and 2 in rates and rates[1]:
            results["scale_2"] = round(rates[2] / rates[1], 2)
        if args.search:
            results["search"] = await search_under_ingest(redis_url, database_url, workload=args.workload, env=env,
                                                           run_dir=args.run_dir)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mesh.bench_ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=WORKLOADS, default="locomo")
    p.add_argument("--updates", type=int, default=1000)
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    p.add_argument("--search", action="store_true", help="also search latency quiet vs while ingesting")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the ltm processes (repeatable)")
    p.add_argument("--out", type=Path)
    p.add_argument("--run-dir", type=Path, help="keep the ltm logs here (default: a temporary directory)")
    args = p.parse_args(argv)
    result = asyncio.run(_main(args))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
