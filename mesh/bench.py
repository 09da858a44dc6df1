"""``python -m mesh bench --out FILE``: the project's benchmark, as JSON.

Each component registers its benchmarks in its own module (``mesh/bench_<component>.py``) with
:func:`bench`; :data:`BENCH_MODULES` lists those modules, so adding a component's benchmarks is one
new module and one line here. A benchmark is ``async def fn(env: BenchEnv) -> list[Measured]``: it
gets real servers and a freshly migrated database, times its operations, and returns samples. This
module turns samples into p50/p95, compares p95 with the operation's seed ceiling and aim, and writes:

``{"generated_at", "machine", "servers", "results": [{"component", "operation", "n", "p50_ms",
"p95_ms", "mean_ms", "max_ms", "ceiling_ms", "aim_ms", "pass", "aim_met", "notes"}], "passed"}``

``pass`` is p95 under the seed ceiling, ``aim_met`` is p95 within the aim. Servers: ``REDIS_URL`` and
``DATABASE_URL`` when set (the database must be one the bench may create databases on); otherwise a
private redis-server and PostgreSQL (durable settings, not the tests' fsync-off ones) are started and
removed afterwards. Importing this module is cheap: the CLI loads it for its options.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_MODULES = ["mesh.bench_memory", "mesh.bench_mesh"]
ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = {
    "memory": ROOT / "services" / "memory" / "migrations",
    "ltm": ROOT / "services" / "ltm" / "migrations",
}


@dataclass
class Measured:
    """The samples of one operation (seconds), with its seed ceiling and aim in milliseconds."""

    operation: str
    samples: list[float]
    ceiling_ms: float | None = None
    aim_ms: float | None = None
    notes: str = ""


@dataclass
class BenchEnv:
    redis_url: str
    database_url: str
    key_prefix: str
    scale: float = 1.0  # < 1 for a quick run (fewer repetitions; the session size stays 1,000 turns)

    def reps(self, n: int) -> int:
        return max(5, int(n * self.scale))


BenchFn = Callable[[BenchEnv], Awaitable[list[Measured]]]


@dataclass
class Registered:
    component: str
    name: str
    fn: BenchFn


REGISTRY: list[Registered] = []


def bench(component: str, name: str | None = None) -> Callable[[BenchFn], BenchFn]:
    """Decorator: register ``fn`` as a benchmark of ``component``."""

    def register(fn: BenchFn) -> BenchFn:
        REGISTRY.append(Registered(component, name or fn.__name__, fn))
        return fn

    return register


@contextmanager
def timer(samples: list[float]) -> Iterator[None]:
    started = time.perf_counter()
    yield
    samples.append(time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (an observed value, no interpolation)."""
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))  # ceil(q/100 * n)
    return ordered[min(rank, len(ordered)) - 1]


def summarise(component: str, m: Measured) -> dict[str, Any]:
    ms = [s * 1000 for s in m.samples]
    p50, p95 = percentile(ms, 50), percentile(ms, 95)
    return {
        "component": component, "operation": m.operation, "n": len(ms),
        "p50_ms": round(p50, 3), "p95_ms": round(p95, 3), "mean_ms": round(sum(ms) / len(ms), 3),
        "max_ms": round(max(ms), 3), "ceiling_ms": m.ceiling_ms, "aim_ms": m.aim_ms,
        "pass": m.ceiling_ms is None or p95 <= m.ceiling_ms,
        "aim_met": None if m.aim_ms is None else p95 <= m.aim_ms,
        "notes": m.notes,
    }


@asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    """A new database with every component's migrations, dropped afterwards."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    from shared.runtime.db import migrate

    name = f"bench_{uuid.uuid4().hex[:10]}"
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        await conn.execute(f"CREATE DATABASE {name}")
    url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    try:
        for component, directory in MIGRATIONS.items():
            await migrate(url, component, directory)
        yield url
    finally:
        async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def servers() -> Iterator[tuple[str, str, dict[str, str]]]:
    """(redis_url, postgres admin url, description): from the environment, or private ones."""
    if os.environ.get("REDIS_URL") and os.environ.get("DATABASE_URL"):
        yield os.environ["REDIS_URL"], os.environ["DATABASE_URL"], {"source": "environment"}
        return
    from mesh.infra import PostgresServer, RedisServer

    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        redis_server = RedisServer(Path(tmp) / "redis", persist=False)
        pg = PostgresServer(Path(tmp) / "pg", ephemeral=True)
        redis_server.start()
        try:
            pg.start()
            try:
                yield redis_server.url, pg.url, {"source": "private", "redis": "redis-server, no persistence",
                                                 "postgres": "embedded PostgreSQL 18 + pgvector, default durability"}
            finally:
                pg.stop()
        finally:
            redis_server.stop()


async def run_all(redis_url: str, admin_url: str, only: list[str] | None, scale: float) -> list[dict[str, Any]]:
    for module in BENCH_MODULES:
        importlib.import_module(module)
    results: list[dict[str, Any]] = []
    for reg in REGISTRY:
        if only and reg.component not in only and reg.name not in only:
            continue
        async with fresh_database(admin_url) as db:
            env = BenchEnv(redis_url, db, f"bench{uuid.uuid4().hex[:8]}:", scale)
            print(f"bench: {reg.component}/{reg.name} ...", file=sys.stderr, flush=True)
            for measured in await reg.fn(env):
                row = summarise(reg.component, measured)
                results.append(row)
                print(f"  {row['operation']}: p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms"
                      f" (ceiling {row['ceiling_ms']}, aim {row['aim_ms']})", file=sys.stderr, flush=True)
    return results


def run_report(out: Path, only: list[str] | None = None, scale: float = 1.0) -> dict[str, Any]:
    with servers() as (redis_url, admin_url, described):
        results = asyncio.run(run_all(redis_url, admin_url, only, scale))
    report = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "servers": described,
        "results": results,
        "passed": all(r["pass"] for r in results),
    }
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="where to write the JSON report")
    parser.add_argument("--only", action="append", help="a component or benchmark name (repeatable)")
    parser.add_argument("--scale", type=float, default=1.0, help="repetitions factor (0.2 for a quick run)")


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command: exit status 1 when an operation's p95 is over its seed ceiling."""
    report = run_report(args.out, args.only, args.scale)
    print(f"bench: wrote {args.out} ({len(report['results'])} results, passed={report['passed']})",
          file=sys.stderr)
    return 0 if report["passed"] else 1

