"""Search latency and throughput of one ltm process, through the bus, on a seeded database.

``python -m mesh.search_probe --admin-url URL --redis-url URL [--sizes 1000,10000,100000] [--fill 889]``

A focused piece of ``make bench`` (mesh/bench_search.py measures the same way, with more): the
database is seeded by :mod:`mesh.bench_seed` (binary COPY of LoCoMo / LongMemEval texts with real
embeddings plus noise; ``--fill`` users of 1,000 memories each so that ``ltm_memories`` holds >= 1M
rows), one ``python -m services.ltm`` process is started with :class:`mesh.bench_procs.Processes`,
and searches go through ``ltm_requests`` with a private reply channel
(:func:`mesh.bench_search.searches`): one requester at each size, then ``--requesters`` at once.
``--env NAME=VALUE`` passes settings to the ltm process (to compare two configurations back to back).
The seeded database is kept and reused by the next run with the same plan.

On a shared, noisy machine wall-clock latency says little; the probe also reports the CPU time each
search costs (Linux ``/proc``): the ltm process, the PostgreSQL server (``--postmaster PID``: the
postmaster and its children), Redis (``--redis-pid``) and the requesting process itself. Two cores
divided by the total is the throughput ceiling of the machine when nothing else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mesh.bench_procs import Processes, ping_ready, say
from mesh.bench_search import clients_for, close_all, searches
from mesh.bench_seed import Queries, SeedPlan, load_corpus, prepare
from mesh.bench_spec import QUICK, Ctx
from shared.contracts import Names


def _ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime of the process


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


class CpuMeter:
    """CPU seconds used by groups of processes between :meth:`start` and :meth:`per` (Linux /proc)."""

    def __init__(self, groups: dict[str, tuple[int, bool]]) -> None:
        self.groups = {k: v for k, v in groups.items() if v[0] > 0}  # name: (pid, with its children)
        self.tick = os.sysconf("SC_CLK_TCK")
        self._start: dict[str, int] = {}
        self._client = 0.0

    def _now(self) -> dict[str, int]:
        out = {}
        for name, (pid, children) in self.groups.items():
            out[name] = _ticks(pid) + (sum(_ticks(c) for c in _children(pid)) if children else 0)
        return out

    def start(self) -> None:
        self._start, self._client = self._now(), time.process_time()

    def per(self, n: int) -> dict[str, float]:
        """Milliseconds of CPU per search of each group, the requesting process and the total."""
        now = self._now()
        out = {name: round((now[name] - self._start[name]) / self.tick * 1000 / max(n, 1), 2) for name in now}
        out["client"] = round((time.process_time() - self._client) * 1000 / max(n, 1), 2)
        out["total"] = round(sum(out.values()), 2)
        return out


async def _measured(meter: CpuMeter, ctx: Ctx, clients: list[Any], user: str, per_client: int) -> dict[str, Any]:
    meter.start()
    r = await searches(ctx, clients, user, per_client)
    r["cpu_ms_per_search"] = meter.per(r["n"])
    return r


async def probe(args: argparse.Namespace) -> dict[str, Any]:
    from shared.runtime.runner import redis_client

    plan = SeedPlan(sizes=tuple(args.seed_sizes), filler_users=args.fill)
    if not set(args.sizes) <= set(plan.sizes):
        raise SystemExit(f"--sizes {args.sizes} must be among --seed-sizes {list(plan.sizes)}")
    spec = replace(QUICK, name="search-probe", seed=plan)
    corpus = load_corpus(spec.locomo, spec.longmemeval, plan.pool_size)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="search-probe-"))
    url, seeded = await prepare(args.admin_url, args.database, plan, corpus, run_dir.parent / "search-probe-data",
                                force=args.force_seed)
    redis = redis_client(args.redis_url)
    procs = Processes(run_dir, run_dir / "data", args.redis_url, url)
    ctx = Ctx(spec, "probe", procs, redis, url, corpus, Queries(corpus.questions, seed=args.query_seed))
    names = Names().with_prefix(f"probe:{args.tag}:")
    env = dict(kv.split("=", 1) for kv in args.env)
    out: dict[str, Any] = {"seed": seeded, "env": env, "single": {}, "concurrent": {}}
    proc = procs.start("ltm", "probe", names.prefix, **env)
    try:
        await ping_ready(redis, names.ltm_requests, proc)
        meter = CpuMeter({"ltm": (proc.pid, True), "postgres": (args.postmaster, True),
                          "redis": (args.redis_pid, False)})
        clients = await clients_for(ctx, names, args.requesters)
        try:
            for size in args.sizes:
                user = SeedPlan.size_user(size)
                # warm: connections, caches, and the ltm's search index (a user's first search loads it in the
                # background; meanwhile searches run in SQL)
                warm_until = time.monotonic() + (args.warm_s if args.warm_s is not None else 2 + size / 8000)
                while True:
                    await searches(ctx, clients[:1], user, args.warm)
                    if time.monotonic() >= warm_until:
                        break
                out["single"][str(size)] = r = await _measured(meter, ctx, clients[:1], user, args.single)
                say(f"{size}: 1 requester p50 {r['p50_ms']} p95 {r['p95_ms']} ms, {r['qps']}/s,"
                    f" cpu ms/search {r['cpu_ms_per_search']}")
                out["concurrent"][str(size)] = r = await _measured(meter, ctx, clients, user, args.per_requester)
                say(f"{size}: {args.requesters} requesters p50 {r['p50_ms']} p95 {r['p95_ms']} ms, {r['qps']}/s,"
                    f" cpu ms/search {r['cpu_ms_per_search']}")
        finally:
            await close_all(clients)
    finally:
        procs.stop_all()
        await redis.aclose()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mesh.search_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--admin-url", required=True, help="PostgreSQL URL of a database the probe may create others on")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--database", default="search_probe", help="the seeded database's name (kept)")
    sizes = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--seed-sizes", type=sizes, default=[1000, 10_000, 100_000],
                   help="memories per user of the measured users (the seeded plan: changing it reseeds)")
    p.add_argument("--sizes", type=sizes, default=[1000, 10_000, 100_000], help="the sizes measured")
    p.add_argument("--fill", type=int, default=889, help="users of 1,000 memories besides the measured ones")
    p.add_argument("--single", type=int, default=200, help="searches of one requester, each size")
    p.add_argument("--requesters", type=int, default=8)
    p.add_argument("--per-requester", type=int, default=40)
    p.add_argument("--warm", type=int, default=10, help="warm-up searches (repeated until --warm-s passed)")
    p.add_argument("--warm-s", type=float, help="warm-up seconds per size (default 2 + memories / 8000)")
    p.add_argument("--query-seed", type=int, default=11)
    p.add_argument("--tag", default="a", help="key prefix part (two probes at once need two tags)")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the ltm process (repeatable)")
    p.add_argument("--postmaster", type=int, default=0, help="PID of the PostgreSQL postmaster (CPU accounting)")
    p.add_argument("--redis-pid", type=int, default=0, help="PID of redis-server (CPU accounting)")
    p.add_argument("--force-seed", action="store_true")
    p.add_argument("--run-dir", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    result = asyncio.run(probe(args))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
