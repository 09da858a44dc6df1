"""``python -m mesh bench``: the mesh measured the way users meet it, as JSON and PNG plots.

Every service is a separate process (``python -m services.<name>``, a log file each under
``<data-dir>/runs/<run>/logs``), each workload on a key prefix of its own, and the bench talks to them
only over Redis: requests ``RPUSH``-ed to ``ltm_requests`` / ``memory_requests`` / ``chat_requests``
with a private ``reply_to`` channel, turns ``XADD``-ed to ``user_input_queue`` and read back from
``ai_responses``, updates ``XADD``-ed to ``memory_updates``. Offline: local embeddings, the offline
responder, no API key (the caller's service settings are not passed on).

Workloads (mesh/bench_spec.py has the sizes of the full run, ``--quick`` and the smoke test's):
``ready`` + ``chat`` + ``memory`` (mesh/bench_mesh.py, mesh/bench_memory.py), ``search`` and ``mem0``
(mesh/bench_search.py), ``ingest`` (mesh/bench_ingest_rate.py). The data: ``ltm_memories`` seeded
directly with SQL (mesh/bench_seed.py) in a database kept between runs (``mesh_bench_<full|quick>``).

Servers: ``REDIS_URL`` / ``DATABASE_URL`` when both are set (the bench creates its database on that
PostgreSQL), otherwise a private redis-server for the run and a PostgreSQL kept in
``<data-dir>/pg`` (default durability) so the seeded data survives. Writes ``bench/results/latest.json``
(``--quick``: ``quick.json``) with ``machine``, ``config``, ``results`` and ``summary`` (each figure with
issue 8's target and ``met``), plots beside it, and exits 0 (targets missed are data, not errors).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from mesh.bench_procs import ROOT, Processes, say

RESULTS = ROOT / "bench" / "results"
PACKAGES = ("torch", "onnxruntime", "sentence-transformers", "mem0ai", "spacy", "numpy", "redis", "psycopg",
            "pydantic", "pgvector")


# --------------------------------------------------------------------------- the machine
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": _loadavg(), "packages": versions, "git": _git(), "reference": reference()}


REFERENCE_TEXT = "What did Caroline research after the support group meeting?"


def reference(reps: int = 50) -> dict[str, float]:
    """How fast this machine is right now, for comparing runs of other days (shared VMs vary by 2x): the median
    time of one query embedding (ONNX, one thread) and of the dot products over 10k vectors, in ms."""
    import numpy as np

    from shared.runtime.embedding import shared_model

    model = shared_model()
    model.encode([REFERENCE_TEXT])
    vecs = np.random.default_rng(0).random((10_000, 384), dtype=np.float32)
    q = vecs[0]

    def median_ms(fn: Any) -> float:
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1000)
        return round(sorted(times)[len(times) // 2], 3)

    return {"embed_query_ms": median_ms(lambda: model.encode([REFERENCE_TEXT])),
            "dot_10k_ms": median_ms(lambda: np.einsum("ij,j->i", vecs, q))}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git() -> dict[str, Any]:
    def out(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": out("rev-parse", "HEAD"), "dirty": bool(out("status", "--porcelain", "--", "services",
                                                                       "shared", "mesh"))}
    except (OSError, subprocess.SubprocessError):
        return {}


async def _server_versions(redis: Any, database_url: str) -> dict[str, Any]:
    import psycopg

    info = await redis.info("server")
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        pg = await (await conn.execute("SHOW server_version")).fetchone()
        vec = await (await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).fetchone()
    return {"redis": info.get("redis_version"), "postgres": pg[0] if pg else None, "pgvector": vec[0] if vec else None}


# --------------------------------------------------------------------------- servers
@contextmanager
def servers(data_dir: Path, run_dir: Path) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(redis_url, postgres admin url, description)."""
    if os.environ.get("REDIS_URL") and os.environ.get("DATABASE_URL"):
        yield os.environ["REDIS_URL"], os.environ["DATABASE_URL"], {"source": "REDIS_URL and DATABASE_URL"}
        return
    from mesh.postgres_server import PostgresServer
    from mesh.redis_server import RedisServer

    redis_server = RedisServer(run_dir / "redis", persist=False)
    pg = PostgresServer(data_dir / "pg")
    redis_server.start()
    try:
        pg.start()
        try:
            yield redis_server.url, pg.url, {"source": "private", "redis": "redis-server, no persistence",
                                             "postgres": f"embedded PostgreSQL + pgvector in {data_dir / 'pg'}, "
                                                         "default durability (kept: it holds the seeded data)"}
        finally:
            pg.stop()
    finally:
        redis_server.stop()


# --------------------------------------------------------------------------- the run
async def run_workloads(spec: Any, procs: Processes, redis_url: str, admin_url: str, data_dir: Path,
                        force_seed: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    from mesh.bench_seed import Queries, load_corpus, prepare, remove_leftovers
    from mesh.bench_spec import Ctx
    from shared.runtime.runner import redis_client

    corpus = load_corpus(spec.locomo, spec.longmemeval, spec.seed.pool_size)
    database_url, seeded = await prepare(admin_url, f"mesh_bench_{spec.name}", spec.seed, corpus, data_dir,
                                         force_seed)
    procs.database_url = database_url
    if left := await remove_leftovers(database_url, spec.seed):
        say(f"seed: removed {left} rows that earlier runs left behind")
    redis = redis_client(redis_url)
    ctx = Ctx(spec, uuid.uuid4().hex[:8], procs, redis, database_url, corpus, Queries(corpus.questions))
    results: dict[str, Any] = {"seed": seeded}
    try:
        servers_seen = await _server_versions(redis, database_url)
        wanted = set(spec.workloads)
        if wanted & {"ready", "chat", "memory"}:
            from mesh.bench_mesh import mesh_workload

            results["mesh"] = await mesh_workload(ctx)
        if "search" in wanted:
            from mesh.bench_search import search_workload

            results["search"] = await search_workload(ctx)
        if "mem0" in wanted:
            from mesh.bench_search import mem0_workload

            results["mem0"] = await mem0_workload(ctx)
        if "ingest" in wanted:
            from mesh.bench_ingest_rate import ingest_workload

            results["ingest"] = await ingest_workload(ctx)
    finally:
        procs.stop_all()
        keys = [k async for k in redis.scan_iter(match=f"bench:{ctx.run_id}:*", count=1000)]
        for i in range(0, len(keys), 500):  # the run's streams, lists and keys (a shared Redis keeps nothing)
            await redis.delete(*keys[i:i + 500])
        await redis.aclose()
    return results, servers_seen


def run_report(spec: Any, out: Path, *, data_dir: Path, force_seed: bool = False,
               urls: tuple[str, str] | None = None) -> dict[str, Any]:
    """Run ``spec`` and write the report to ``out`` (and its plots beside it); returns the report."""
    from mesh.bench_report import figures, mem0_ratios, plots
    from mesh.bench_spec import judge

    started = time.time()
    run_dir = data_dir / "runs" / time.strftime(f"%Y%m%d-%H%M%S-{spec.name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    say(f"bench {spec.name}: workloads {', '.join(spec.workloads)}; run directory {run_dir}")
    described = machine()
    with servers(data_dir, run_dir) if urls is None else _given(urls) as (redis_url, admin_url, where):
        procs = Processes(run_dir, data_dir, redis_url, admin_url)
        try:
            results, versions = asyncio.run(run_workloads(spec, procs, redis_url, admin_url, data_dir, force_seed))
        finally:
            procs.stop_all()  # whatever happened inside
    if "mem0" in results:
        results["mem0"]["ratios"] = mem0_ratios(results)
    described["loadavg_end"] = _loadavg()
    report = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "kind": spec.name,
        "duration_s": round(time.time() - started, 1), "machine": described,
        "servers": {**where, **versions}, "config": spec.describe(), "run_dir": str(run_dir),
        "results": results, "summary": judge(figures(results)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    report["plots"] = [str(Path(p).relative_to(out.parent)) if Path(p).is_relative_to(out.parent) else p
                       for p in plots(report, out.with_suffix(""))]
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


@contextmanager
def _given(urls: tuple[str, str]) -> Iterator[tuple[str, str, dict[str, str]]]:
    yield urls[0], urls[1], {"source": "given"}


# --------------------------------------------------------------------------- command line
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes (writes quick.json)")
    parser.add_argument("--out", type=Path, help="the JSON report (default bench/results/latest.json, or quick.json)")
    parser.add_argument("--only", action="append", help="workloads to run, comma-separated (ready, chat, memory, "
                                                        "search, mem0, ingest); default all")
    parser.add_argument("--force-seed", action="store_true", help="seed the bench database again even if it is kept")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".data" / "bench",
                        help="kept data (PostgreSQL, embedding cache) and run logs (default .data/bench)")
    parser.add_argument("--locomo", type=Path, help="LoCoMo-format file (default ../shared/data/locomo/...)")
    parser.add_argument("--longmemeval", type=Path, help="LongMemEval-format file (default ../shared/data/...)")
    parser.add_argument("--write-readme", action="store_true",
                        help="only rewrite the README's bench table from --from (default bench/results/latest.json)")
    parser.add_argument("--from", dest="source", type=Path, help="the result file --write-readme reads")


def run(args: argparse.Namespace) -> int:
    from mesh.bench_spec import FULL, QUICK, WORKLOADS

    if args.write_readme:
        from mesh.bench_report import write_readme

        source = args.source or RESULTS / "latest.json"
        write_readme(source)
        print(f"README.md: bench table written from {source}")
        return 0
    spec = QUICK if args.quick else FULL
    if args.only:
        chosen = tuple(w.strip() for item in args.only for w in item.split(",") if w.strip())
        unknown = sorted(set(chosen) - set(WORKLOADS))
        if unknown:
            raise SystemExit(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
        spec = replace(spec, workloads=chosen)
    spec = replace(spec, locomo=args.locomo or spec.locomo, longmemeval=args.longmemeval or spec.longmemeval)
    for path in (spec.locomo, spec.longmemeval):
        if not path.is_file():
            raise SystemExit(f"no such file: {path} (pass --locomo / --longmemeval)")
    out = args.out or RESULTS / ("quick.json" if args.quick else "latest.json")
    signal.signal(signal.SIGTERM, _terminate)  # so that every clean-up below runs
    report = run_report(spec, out, data_dir=args.data_dir, force_seed=args.force_seed)
    say(f"wrote {out} and {', '.join(report['plots'])}")
    for key, row in report["summary"].items():
        if row["value"] is not None:
            mark = {True: "met", False: "MISSED", None: ""}[row["met"]]
            print(f"  {key:28} {row['value']!s:>10} {row['unit']:12} {row['target'] or '':8} {mark}",
                  file=sys.stderr)
    return 0


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
