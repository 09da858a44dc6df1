"""``python -m mesh eval locomo --data PATH --out FILE [--backend native|mem0]``: LoCoMo retrieval recall.

Everything goes through the real bus. Redis and PostgreSQL are reused when ``REDIS_URL`` and
``DATABASE_URL`` are set (that very database) or a ``mesh up`` stack is running (its servers, with a
database of the run's own, ``mesh_locomo_<run>``, dropped after unless ``--keep``), else started for
the run (and removed after). An ltm worker with the chosen backend runs in this process on bus names of its own (a key
prefix per run), so a running stack's workers never take the evaluation's messages.

1. Each conversation is one user. Every turn is a MemoryUpdate ``XADD``-ed to ``memory_updates``:
   content ``"<speaker>: <text>"`` (plus ``[shares a photo: <caption>]`` for an image), meta
   ``session_id``, ``message_id``, ``speaker`` and ``dia_id``, timestamp the session's date (the
   turn's index in seconds added, so turns keep their order).
2. When the ``ltm`` group has consumed everything, every question is an ltm ``search`` through
   ``ltm_requests`` (limit 10, then limit 20). Returned memories and their context turns map back to
   ``dia_id`` through ``source.message_id`` (exact content as a fallback).
3. A question counts for recall@k ``any`` when one evidence turn is in the first k results (with
   their context), ``all`` when every one is. Categories 1-4 make the summary; 5 (adversarial) is
   reported apart. Questions without a usable evidence id are skipped and counted. Tokens: WordPiece
   tokens of all the content of the limit-10 answer (memories and context).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
SCORED = (1, 2, 3, 4)
KS = (5, 10, 20)
MIGRATIONS = Path(__file__).resolve().parent.parent / "services" / "ltm" / "migrations"
_DIA = re.compile(r"D\s*:?\s*(\d+)\s*:\s*(\d+)")
_DATE_FORMATS = ("%I:%M %p on %d %B, %Y", "%I:%M %p on %d %b, %Y", "%I:%M %p on %B %d, %Y")


# --------------------------------------------------------------------------- data
@dataclass(frozen=True, slots=True)
class Turn:
    dia_id: str
    speaker: str
    content: str
    session_id: str
    timestamp: float
    message_id: str


@dataclass(frozen=True, slots=True)
class Question:
    text: str
    category: int
    evidence: frozenset[str]


@dataclass(slots=True)
class Conversation:
    sample_id: str
    turns: list[Turn] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)
    skipped: int = 0


def parse_evidence(raw: Any) -> set[str]:
    """Dialogue ids from an evidence list, tolerating malformed ones ("D:11:26", "D8:6; D9:17")."""
    items = raw if isinstance(raw, list) else [raw]
    return {f"D{a}:{b}" for item in items if isinstance(item, str) for a, b in _DIA.findall(item)}


def parse_date(text: Any) -> float | None:
    if isinstance(text, str):
        for fmt in _DATE_FORMATS:
            try:
                return datetime.strptime(text.strip(), fmt).replace(tzinfo=UTC).timestamp()
            except ValueError:
                continue
    return None


def load(path: Path) -> list[Conversation]:
    from shared.contracts.messages import derive_id

    samples = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for n, sample in enumerate(samples):
        sample_id = str(sample.get("sample_id") or f"sample-{n}")
        conv = Conversation(sample_id)
        sessions = sample.get("conversation", {})
        numbers = sorted(int(m.group(1)) for k in sessions if (m := re.fullmatch(r"session_(\d+)", k)))
        when = 0.0
        for s in numbers:
            when = parse_date(sessions.get(f"session_{s}_date_time")) or when + 86_400.0
            for i, t in enumerate(sessions.get(f"session_{s}") or []):
                text, dia = str(t.get("text") or "").strip(), str(t.get("dia_id") or f"D{s}:{i + 1}")
                if t.get("blip_caption"):
                    text = f"{text} [shares a photo: {t['blip_caption']}]".strip()
                if not text:
                    continue
                speaker = str(t.get("speaker") or "unknown")
                conv.turns.append(Turn(dia, speaker, f"{speaker}: {text}", f"{sample_id}:session_{s}", when + i,
                                       derive_id("locomo", sample_id, dia)))
        known = {t.dia_id for t in conv.turns}
        for qa in sample.get("qa", []):
            evidence = frozenset(parse_evidence(qa.get("evidence", [])) & known)
            category = qa.get("category")
            if not evidence or not isinstance(category, int) or not qa.get("question"):
                conv.skipped += 1
                continue
            conv.questions.append(Question(str(qa["question"]), category, evidence))
        out.append(conv)
    return out


# --------------------------------------------------------------------------- scoring
@dataclass(slots=True)
class Outcome:
    category: int
    any: dict[int, bool]
    all10: bool
    tokens: int
    latency_ms: float
    all5: bool | None = None
    conversation: str = ""


def shown(memories: list[Any], k: int, dia_of: dict[str, str], by_content: dict[str, str]) -> set[str]:
    """Dialogue ids of the first k memories and their context turns."""
    found = set()
    for m in memories[:k]:
        for mid, text in [(m.source.message_id, m.content), *((c.message_id, c.content) for c in m.context)]:
            dia = dia_of.get(mid or "") or by_content.get(text)
            if dia:
                found.add(dia)
    return found


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    def rate(values: list[bool]) -> float:
        return round(sum(values) / len(values), 4) if values else 0.0

    return {
        **{f"recall@{k}_any": rate([o.any[k] for o in outcomes]) for k in KS},
        "recall@10_all": rate([o.all10 for o in outcomes]),
        **({"recall@5_all": rate([bool(o.all5) for o in outcomes])} if all(o.all5 is not None for o in outcomes)
           else {}),
        "tokens_per_question": round(statistics.fmean(o.tokens for o in outcomes), 1) if outcomes else 0.0,
        "questions": len(outcomes),
    }


def report(outcomes: list[Outcome], backend: str, extra: dict[str, Any]) -> dict[str, Any]:
    scored = [o for o in outcomes if o.category in SCORED]
    latencies = sorted(o.latency_ms for o in outcomes)

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else 0.0

    return {
        "summary": summarise(scored),
        "per_category": {str(c): {"name": CATEGORIES[c], **summarise([o for o in scored if o.category == c])}
                         for c in SCORED if any(o.category == c for o in scored)},
        "adversarial": summarise([o for o in outcomes if o.category == 5]),
        "per_conversation": {c: summarise([o for o in scored if o.conversation == c])
                             for c in dict.fromkeys(o.conversation for o in scored) if c},
        "latency_ms": {"p50": pct(0.50), "p95": pct(0.95)},
        # per scored question, in order: conversation, category, any@5, any@10, all@5, all@10 (paired comparisons)
        "questions": [[o.conversation, o.category, o.any[5], o.any[10], o.all5, o.all10] for o in scored],
        "backend": backend,
        **extra,
    }


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(f"{c} {v['name']}", v) for c, v in result["per_category"].items()]
    if result["adversarial"]["questions"]:
        groups.append(("5 adversarial", result["adversarial"]))
    groups.append(("all 1-4", result["summary"]))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(KS)
    for j, k in enumerate(KS):
        xs = [i + (j - (len(KS) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [g[f"recall@{k}_any"] for _, g in groups], width, label=f"recall@{k} any")
    ax.set_xticks(range(len(groups)), [f"{name}\n(n={g['questions']})" for name, g in groups])
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall (any evidence turn)")
    ax.set_title(f"LoCoMo retrieval, {result['backend']} backend, "
                 f"{result['summary']['tokens_per_question']:.0f} tokens/question")
    ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the run
def stores(database: str | None = None, keep: bool = False) -> Any:
    """A context manager yielding (REDIS_URL, DATABASE_URL): reused, or started for this run.

    ``REDIS_URL`` and ``DATABASE_URL`` from the environment are used as they are. A running ``mesh up`` stack's
    servers are reused, but with ``database`` the run gets a database of its own on that server (created, and
    dropped afterwards unless ``keep``): the stack's own services never see the run's data (its memory service
    would otherwise embed every imported message, competing with the run for the CPU).
    """
    import os
    import re
    import tempfile
    from contextlib import ExitStack, contextmanager

    from mesh.postgres_server import PostgresServer
    from mesh.redis_server import RedisServer
    from mesh.stack_files import StackPaths, read_env_file, running_stack_pid

    @contextmanager
    def cm() -> Any:
        env = dict(os.environ)
        paths = StackPaths.from_arg(None)
        explicit = bool(env.get("DATABASE_URL"))
        if not (env.get("REDIS_URL") and env.get("DATABASE_URL")) and running_stack_pid(paths):
            given = {k: v for k, v in env.items() if k in ("REDIS_URL", "DATABASE_URL")}
            env = read_env_file(paths.env)
            if env.get("DATABASE_ADMIN_URL"):  # the evaluation makes its own database: the stack's superuser
                env["DATABASE_URL"] = env["DATABASE_ADMIN_URL"]
            env.update(given)
        with ExitStack() as stack:
            redis_url, database_url = env.get("REDIS_URL"), env.get("DATABASE_URL")
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mesh-eval-")))
            if not redis_url:
                redis = RedisServer(tmp / "redis", persist=False)
                redis_url = redis.start()
                stack.callback(redis.stop)
            if not database_url:
                pg = PostgresServer(tmp / "pg", fast=True, ephemeral=True)
                database_url = pg.start()
                stack.callback(pg.stop)
            elif database and not explicit:
                name = re.sub(r"[^a-z0-9_]", "_", database.lower())[:60]
                database_url = _own_database(database_url, name)
                if not keep:
                    stack.callback(_drop_database, database_url)
            yield redis_url, database_url

    return cm()


def _own_database(server_url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``server_url``, created if it does not exist."""
    import psycopg
    from psycopg import sql

    from mesh.bench_seed import database_url

    with psycopg.connect(server_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url(server_url, name)


def _drop_database(url: str) -> None:
    from urllib.parse import urlsplit

    import psycopg
    from psycopg import sql

    from mesh.bench_seed import database_url

    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(database_url(url, "postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def pick(convs: list[Conversation], conversations: int | str | None) -> list[Conversation]:
    """``--conversations``: the first N (a number), or the named samples (``conv-43,conv-26``)."""
    if conversations is None:
        return convs
    if isinstance(conversations, int) or conversations.isdigit():
        return convs[: int(conversations)]
    wanted = [c.strip() for c in conversations.split(",") if c.strip()]
    unknown = set(wanted) - {c.sample_id for c in convs}
    if unknown:
        raise SystemExit(f"no such conversation: {', '.join(sorted(unknown))}")
    return [c for c in convs if c.sample_id in wanted]


async def evaluate(data: Path, backend_name: str, *, conversations: int | str | None = None,
                   keep: bool = False, progress: bool = True) -> dict[str, Any]:
    import asyncio
    import time

    from tqdm import tqdm

    from services.ltm.config import LtmSettings
    from services.ltm.retrieval import count_tokens
    from services.ltm.service import LtmService, build_backend
    from shared.contracts import LTM_RESPONSE, LTMResponse, MemoryUpdate, Names, encode, new_id
    from shared.contracts.messages import (
        DeleteUserRequest,
        MemoryUpdateMeta,
        RequestEnvelope,
        SearchData,
        SearchRequest,
    )
    from shared.runtime.db import migrate, open_pool
    from shared.runtime.embedding import shared_model
    from shared.runtime.logging import configure_logging
    from shared.runtime.metrics import Metrics
    from shared.runtime.requests import RpcClient
    from shared.runtime.runner import redis_client

    convs = pick(load(data), conversations)
    run = new_id()[:8]
    users = {c.sample_id: f"locomo-{c.sample_id}-{run}" for c in convs}
    dia_of = {t.message_id: t.dia_id for c in convs for t in c.turns}
    by_content = {t.content: t.dia_id for c in convs for t in c.turns}
    with stores(f"mesh_locomo_{run}", keep) as (redis_url, database_url):
        settings = LtmSettings(redis_url=redis_url, database_url=database_url, ltm_backend=backend_name,
                               log_level="WARNING")
        configure_logging("ltm", settings.log_level, "console", False)
        names = Names.from_env().with_prefix(f"eval-locomo:{run}:")
        await migrate(database_url, "ltm", MIGRATIONS)
        model = await asyncio.to_thread(shared_model)
        pool = await open_pool(database_url, max_size=settings.db_pool_max, name="eval")
        redis = redis_client(redis_url)
        service = LtmService(settings, names, redis, build_backend(settings, pool, model, redis, names))
        worker = asyncio.create_task(service.run())
        rpc: RpcClient[LTMResponse] = RpcClient(redis, queue=names.ltm_requests,
                                                reply_channel=names.reply_channel(names.ltm_responses, run),
                                                adapter=LTM_RESPONSE, metrics=Metrics())
        await rpc.start()

        async def call(request: RequestEnvelope) -> LTMResponse:
            for attempt in range(3):
                try:
                    return await rpc.call(request.model_copy(update={"request_id": new_id()}), timeout=60)
                except TimeoutError:
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

        try:
            started = time.perf_counter()
            ids = []
            for c in convs:
                for t in c.turns:
                    update = MemoryUpdate(user_id=users[c.sample_id], content=t.content, source="user",
                                          timestamp=t.timestamp,
                                          meta=MemoryUpdateMeta.model_validate({
                                              "session_id": t.session_id, "message_id": t.message_id,
                                              "speaker": t.speaker, "dia_id": t.dia_id}))
                    ids.append(await redis.xadd(names.memory_updates, {"data": encode(update)}))
            await _wait_ingested(redis, names, ids, progress, worker)
            ingest_s = time.perf_counter() - started
            outcomes: list[Outcome] = []
            total = sum(len(c.questions) for c in convs)
            bar = tqdm(total=total, desc="questions", unit="q", disable=not progress)
            for c in convs:
                for q in c.questions:
                    asked = time.perf_counter()
                    r10 = await call(SearchRequest(request_id="-", type="search", user_id=users[c.sample_id],
                                                   data=SearchData(query=q.text, limit=10)))
                    latency = (time.perf_counter() - asked) * 1000
                    r20 = await call(SearchRequest(request_id="-", type="search", user_id=users[c.sample_id],
                                                   data=SearchData(query=q.text, limit=20)))
                    for r in (r10, r20):
                        if not r.success:
                            raise RuntimeError(f"search failed: {r.error}")
                    seen = {k: shown(r20.memories if k == 20 else r10.memories, k, dia_of, by_content) for k in KS}
                    texts = [m.content for m in r10.memories] + [x.content for m in r10.memories for x in m.context]
                    outcomes.append(Outcome(q.category, {k: bool(q.evidence & seen[k]) for k in KS},
                                            q.evidence <= seen[10], sum(count_tokens(texts)), latency,
                                            q.evidence <= seen[5], c.sample_id))
                    bar.update()
            bar.close()
            if not keep:
                for user in users.values():
                    await call(DeleteUserRequest(request_id="-", type="delete_user", user_id=user))
        finally:
            await rpc.close()
            service.stop()
            await asyncio.wait_for(worker, 60)
            await redis.aclose()
            await pool.close()
    extra = {
        "data": str(data), "conversations": len(convs), "turns": len(dia_of),
        "skipped_questions": sum(c.skipped for c in convs), "ingest_s": round(ingest_s, 1),
        "retrieval": _describe(settings),
    }
    return report(outcomes, backend_name, extra)


def _describe(settings: Any) -> dict[str, Any]:
    if settings.ltm_backend != "native":
        return {}
    return {"profile": settings.ltm_rank_profile, "context_turns": settings.ltm_context_turns,
            "max_tokens": settings.ltm_result_tokens, "token_unit": "all-MiniLM-L6-v2 WordPiece"}


async def _wait_ingested(redis: Any, names: Any, ids: list[Any], progress: bool, worker: Any) -> None:
    """Until the ``ltm`` group has delivered and acknowledged every entry (a progress bar meanwhile)."""
    import asyncio

    from tqdm import tqdm

    def key(entry: Any) -> tuple[int, int]:
        ms, _, seq = (entry.decode() if isinstance(entry, bytes) else str(entry)).partition("-")
        return int(ms), int(seq or 0)

    last = key(ids[-1]) if ids else (0, 0)
    bar = tqdm(total=len(ids), desc="ingest", unit="turn", disable=not progress)
    while True:
        if worker.done():
            worker.result()
            raise RuntimeError("the ltm worker stopped during ingest")
        groups = await redis.xinfo_groups(names.memory_updates) if await redis.exists(names.memory_updates) else []
        group = next((g for g in groups if _text(g.get("name")) == names.ltm_group), None)
        if group is not None:
            delivered = key(group.get("last-delivered-id") or b"0-0")
            pending = int(group.get("pending") or 0)
            done = sum(1 for i in ids if key(i) <= delivered) - pending
            bar.update(max(done, 0) - bar.n)
            if delivered >= last and pending == 0:
                break
        await asyncio.sleep(0.5)
    bar.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- command line
def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="benchmark")
    p = sub.add_parser("locomo", help="LoCoMo retrieval recall through the bus",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="a file in LoCoMo's format (locomo10.json or a split)")
    p.add_argument("--out", required=True, type=Path, help="the JSON report; the chart goes beside it (.png)")
    p.add_argument("--backend", choices=("native", "mem0"), default="native")
    p.add_argument("--chart", type=Path, help="where to write the PNG chart (default: OUT with .png)")
    p.add_argument("--conversations", help="evaluate only the first N conversations, or the named ones "
                                           "(comma-separated sample ids: conv-43,conv-26)")
    p.add_argument("--keep", action="store_true", help="keep the evaluation's users in the database")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import asyncio

    if not args.data.is_file():
        raise SystemExit(f"no such file: {args.data}")
    result = asyncio.run(evaluate(args.data, args.backend, conversations=args.conversations, keep=args.keep,
                                  progress=not args.no_progress))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    png = args.chart or args.out.with_suffix(".png")
    chart(result, png)
    s = result["summary"]
    print(f"{result['backend']}: recall@10 any {s['recall@10_any']:.3f}, all {s['recall@10_all']:.3f}, "
          f"{s['tokens_per_question']:.0f} tokens/question, p50 {result['latency_ms']['p50']} ms "
          f"over {s['questions']} questions -> {args.out}, {png}")
    return 0
