"""What one bench run does (:class:`Spec`: the full run, ``--quick``, or a tiny one for the smoke test), the
targets of issue 8 it is judged against, and the context every workload gets (:class:`Ctx`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from mesh.bench_procs import Processes
from mesh.bench_seed import Corpus, Queries, SeedPlan

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
LOCOMO = DATA / "locomo" / "locomo10-dev.json"
LONGMEMEVAL = DATA / "longmemeval" / "longmemeval-s-dev.json"
WORKLOADS = ("ready", "chat", "memory", "search", "mem0", "ingest")


@dataclass(frozen=True)
class Spec:
    name: str
    seed: SeedPlan
    single_searches: int  # one requester, per size
    concurrency: tuple[int, ...]  # concurrent requesters, each size
    searches_per_requester: int
    search_processes: tuple[int, ...]  # ltm processes serving 8 requesters at scale_size
    scale_size: int  # memories per user for the processes comparison and the search-while-ingesting one
    ingesting_backlog: int  # LoCoMo updates queued while searching
    ingesting_searches: int  # quiet, then again while ingesting (500 in a full run: the p95 of 200 moved 0.8-2.0x)
    mem0_sizes: tuple[int, ...]
    mem0_searches: int
    chat_sessions: int
    chat_turns: int  # per session, saturated run (long enough to show the steady state, not the first seconds)
    chat_think_s: float  # paced run: mean pause between a session's turns (0: only the saturated run)
    chat_paced_turns: int  # per session, paced run
    ingest_short: int  # LoCoMo turns per ingest measurement
    ingest_long: int  # LongMemEval turns per ingest measurement
    ingest_processes: tuple[int, ...]
    ingest_timebox_s: float  # a measurement stops here (the rate is then what was done so far)
    ready_reps: int
    memory_turns: int  # turns of the memory service's long session
    memory_reps: int
    workloads: tuple[str, ...] = WORKLOADS
    locomo: Path = LOCOMO
    longmemeval: Path = LONGMEMEVAL
    limit: int = 10  # results asked of every search

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out["seed"]["rows"] = self.seed.rows()
        out["locomo"], out["longmemeval"] = str(self.locomo), str(self.longmemeval)
        return out


FULL = Spec(
    name="full", seed=SeedPlan(sizes=(1000, 10_000, 100_000), filler_users=889), single_searches=300,
    concurrency=(1, 2, 4, 8), searches_per_requester=50, search_processes=(1, 2), scale_size=10_000,
    ingesting_backlog=2760, ingesting_searches=500, mem0_sizes=(1000, 10_000), mem0_searches=200,
    chat_sessions=50, chat_turns=20, chat_think_s=5.0, chat_paced_turns=4,
    ingest_short=2760, ingest_long=2000, ingest_processes=(1, 2),
    ingest_timebox_s=600.0, ready_reps=3, memory_turns=1000, memory_reps=100,
)
QUICK = Spec(
    name="quick", seed=SeedPlan(sizes=(1000, 10_000), filler_users=50), single_searches=60,
    concurrency=(1, 2, 4, 8), searches_per_requester=10, search_processes=(1, 2), scale_size=10_000,
    ingesting_backlog=800, ingesting_searches=40, mem0_sizes=(1000,), mem0_searches=40,
    chat_sessions=50, chat_turns=4, chat_think_s=5.0, chat_paced_turns=2,
    ingest_short=400, ingest_long=40, ingest_processes=(1, 2),
    ingest_timebox_s=90.0, ready_reps=1, memory_turns=300, memory_reps=20,
)


def tiny(locomo: Path, longmemeval: Path) -> Spec:
    """The smoke test's run: every workload, a few of everything."""
    return replace(QUICK, name="tiny", seed=SeedPlan(sizes=(30, 120), filler_users=3, filler_size=30, pool_size=200),
                   single_searches=4, concurrency=(1, 2), searches_per_requester=2, scale_size=120,
                   ingesting_backlog=30, ingesting_searches=4, mem0_sizes=(30,), mem0_searches=4, chat_sessions=3,
                   chat_turns=1, chat_think_s=0.2, chat_paced_turns=1, ingest_short=12, ingest_long=4,
                   ingest_timebox_s=120.0,
                   memory_turns=20, memory_reps=3, locomo=locomo, longmemeval=longmemeval)


@dataclass(frozen=True)
class Target:
    """One figure of the summary and the issue's target for it (``op`` None: reported, no target)."""

    key: str
    op: str | None
    threshold: float | None
    unit: str
    what: str


TARGETS = [
    Target("search_p95_ms_10k", "<=", 20, "ms", "ltm search p95, one requester, 10k memories per user"),
    Target("search_qps_8_10k", ">=", 150, "searches/s", "8 concurrent requesters, 10k memories per user"),
    Target("search_p95_ms_8_10k", "<=", 100, "ms", "search p95 with 8 concurrent requesters, 10k memories"),
    Target("chat_p95_ms_50", "<=", 150, "ms", "chat turn p95 (XADD user_input to AIResponse), 50 sessions at once"),
    Target("chat_without_memory_50", "<=", 0, "turns", "turns answered without memory (meta.ltm != hit), 50 sessions"),
    Target("chat_p95_ms_50_paced", "<=", 150, "ms",
           "chat turn p95, 50 sessions each pausing 2.5-7.5 s between turns (people typing), not saturated"),
    Target("chat_without_memory_50_paced", "<=", 0, "turns", "turns without memory, the same paced 50 sessions"),
    Target("ingest_per_s_1", ">=", 150, "updates/s",
           "ingest with extraction, LoCoMo short turns, one ltm process (vectors carried, as memory sends them)"),
    Target("ingest_per_s_1_long", ">=", 20, "updates/s", "ingest with extraction, LongMemEval long turns, one ltm"),
    Target("ingest_scale_2", ">=", 1.8, "x", "ingest rate of two ltm processes over one (LoCoMo turns)"),
    Target("search_p95_ratio_ingesting", "<=", 1.5, "x", "search p95 while ingest runs flat out / quiet mesh"),
    Target("ready_s", "<=", 5, "s", "slowest service from process start to its first ping answer, stores up"),
    Target("search_p95_ms_10k_mem0", None, None, "ms", "the same searches through LTM_BACKEND=mem0, 10k memories"),
    Target("search_p95_ratio_mem0_10k", None, None, "x", "mem0 p95 / native p95 at 10k memories"),
    Target("search_p95_ratio_mem0_1k", None, None, "x", "mem0 p95 / native p95 at 1k memories"),
    Target("mem0_fewer_than_limit", None, None, "searches",
           "mem0 searches that returned fewer than 10 results for a user with >= 10 memories"),
    Target("ingest_per_s_1_uncarried", None, None, "updates/s",
           "the same short turns without a vector (ltm embeds each turn itself)"),
    Target("ingest_per_s_1_long_uncarried", None, None, "updates/s", "the same long turns without a vector"),
    Target("search_p95_ms_1k", None, None, "ms", "ltm search p95, one requester, 1k memories per user"),
    Target("search_p95_ms_100k", None, None, "ms", "ltm search p95, one requester, 100k memories per user"),
]


def judge(values: dict[str, Any]) -> dict[str, Any]:
    """The summary: each figure with its target and whether it is met (None: not measured or no target)."""
    out: dict[str, Any] = {}
    for t in TARGETS:
        v = values.get(t.key)
        met = None
        if v is not None and t.op is not None and t.threshold is not None:
            met = bool(v <= t.threshold) if t.op == "<=" else bool(v >= t.threshold)
        out[t.key] = {"value": v, "target": f"{t.op} {t.threshold:g}" if t.op and t.threshold is not None else None,
                      "met": met, "unit": t.unit, "what": t.what}
    return out


@dataclass
class Ctx:
    """What every workload gets: the run's spec, processes, Redis, the seeded database, the texts."""

    spec: Spec
    run_id: str
    procs: Processes
    redis: aioredis.Redis
    database_url: str
    corpus: Corpus
    queries: Queries
    results: dict[str, Any] = field(default_factory=dict)

    def prefix(self, workload: str) -> str:
        return f"bench:{self.run_id}:{workload}:"
