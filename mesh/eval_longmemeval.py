"""``python -m mesh eval longmemeval --data FILE --out OUT``: long-term memory measured in the prompt chat_ai sends.

The mesh runs as it is deployed: memory, ``--ltm-workers`` copies of ltm and chat_ai, each its own process
(``python -m services.<name>``), on bus names of their own (``MESH_KEY_PREFIX=lme:<run>:``). Redis and
PostgreSQL are reused when ``REDIS_URL`` and ``DATABASE_URL`` are set (that very database) or a ``mesh up`` stack
is running (its servers, with a database of the run's own, ``mesh_lme_<run>``, dropped after unless ``--keep``),
else started for the run and removed after. memory and ltm run offline (no ``OPENAI_*``); chat_ai talks to a
recording server (mesh/recorder.py) that this command starts, so chat_ai takes its LLM path and the exact prompt
it builds is captured.

1. Each question is a fresh user (``lme-<question_id>-<run>``). Its haystack is imported through the memory
   service (``import_messages`` on ``memory_requests``, batches of at most ``MEMORY_IMPORT_MAX_BATCH``): one
   session per haystack session (id prefixed by the user), timestamps from ``haystack_dates`` (UTC) plus the
   turn's index in seconds, message ids derived from user, session and turn (a re-import dedups).
2. The command waits until the ``ltm`` group on ``memory_updates`` has nothing left (lag 0, pending 0).
3. Each question is then a ``UserInput`` on ``user_input_queue`` in a new session, timestamped
   ``question_date``; the reply is read from ``ai_responses``. Questions are asked one at a time, or
   ``--concurrency N`` at once (N people asking at the same time: the next question goes as soon as one is
   answered, so the memory search runs under that load, at the default ``LTM_TIMEOUT_MS``), and the recorded
   prompt is the one whose last user message is the question.
4. The memory block is the prompt's system message that starts with ``MEMORY_HEADER``
   (services/chat_ai/prompt.py). A ``has_answer`` turn counts as found when ``contains_turn`` finds it in the
   block; a question's ``evidence_turn_any``/``_all`` say whether one / every such turn was found.
   ``evidence_session_any``: a turn of an ``answer_session_ids`` session is in the block; only turns that
   identify their session count (at least 20 characters, in no other session of the haystack). Tokens:
   ``count_tokens`` (all-MiniLM-L6-v2 WordPiece) of the block, 0 when there is none.

With ``OPENAI_API_KEY`` or ``OPENAI_BASE_URL`` set (and no ``--no-llm``), the recorder forwards each request to
that model and the answers are graded with LongMemEval's judge prompts (mesh/longmemeval_judge.py) by
``--judge-model`` (default ``LLM_MODEL``): ``qa_accuracy`` is reported too. ``--questions N`` takes N questions
round-robin over the question types, in file order (the first of each type, then the second of each, ...);
``--types T...`` keeps only questions of those types.
The report is JSON; beside it go a PNG chart (``OUT`` with ``.png``) and every captured prompt
(``OUT`` with ``.prompts.jsonl``). Service logs are kept in ``--run-dir``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_DATE = re.compile(r"(\d{4})/(\d{1,2})/(\d{1,2})\D*?(\d{1,2}):(\d{2})")
MIN_SESSION_MARKER_CHARS = 20
LTM_STATUSES = ("hit", "miss", "timeout", "error", "disabled", "no_reply")


# --------------------------------------------------------------------------- data
@dataclass(frozen=True, slots=True)
class Turn:
    session_id: str  # the data's haystack session id
    session_key: str  # unique within the question (a session repeated in the haystack gets "#2", ...)
    index: int
    role: str  # user | assistant
    content: str
    timestamp: float
    has_answer: bool


@dataclass(slots=True)
class Question:
    question_id: str
    question_type: str
    question: str
    answer: str
    question_date: str
    asked_at: float
    answer_sessions: frozenset[str]
    turns: list[Turn] = field(default_factory=list)
    skipped_turns: int = 0  # empty turns, not imported

    @property
    def evidence(self) -> list[Turn]:
        return [t for t in self.turns if t.has_answer]

    @property
    def sessions(self) -> list[str]:
        return list(dict.fromkeys(t.session_key for t in self.turns))


def parse_date(text: Any) -> float | None:
    """``"2023/05/30 (Tue) 23:42"`` as a UTC timestamp (None when it does not parse)."""
    m = _DATE.search(text) if isinstance(text, str) else None
    if not m:
        return None
    try:
        year, month, day, hour, minute = (int(g) for g in m.groups())
        return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()
    except ValueError:
        return None


def load(path: Path) -> list[Question]:
    """The questions of a LongMemEval-format file (a JSON list); ValueError naming what is wrong."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of questions (LongMemEval's format)")
    out = []
    for n, item in enumerate(raw):
        missing = [k for k in ("question_id", "question", "haystack_sessions") if not item.get(k)]
        if missing:
            raise ValueError(f"{path}: question #{n} has no {', '.join(missing)}")
        sessions = item["haystack_sessions"]
        ids = list(item.get("haystack_session_ids") or [f"session_{i}" for i in range(len(sessions))])
        dates = list(item.get("haystack_dates") or [])
        if len(ids) != len(sessions):
            raise ValueError(f"{path}: question {item['question_id']}: {len(ids)} session ids for "
                             f"{len(sessions)} sessions")
        q = Question(str(item["question_id"]), str(item.get("question_type") or "unknown"), str(item["question"]),
                     str(item.get("answer", "")), str(item.get("question_date") or ""), 0.0,
                     frozenset(str(s) for s in item.get("answer_session_ids") or []))
        seen: Counter[str] = Counter()
        when = 0.0
        for i, (sid, turns) in enumerate(zip(ids, sessions, strict=True)):
            sid = str(sid)
            seen[sid] += 1
            key = sid if seen[sid] == 1 else f"{sid}#{seen[sid]}"
            when = parse_date(dates[i] if i < len(dates) else None) or when + 3600.0
            for j, t in enumerate(turns or []):
                content = str(t.get("content") or "")
                if not content.strip():
                    q.skipped_turns += 1
                    continue
                role = "assistant" if t.get("role") == "assistant" else "user"
                q.turns.append(Turn(sid, key, j, role, content, when + j, bool(t.get("has_answer"))))
        latest = max((t.timestamp for t in q.turns), default=0.0)
        q.asked_at = parse_date(q.question_date) or latest + 86_400.0
        out.append(q)
    return out


def select(questions: list[Question], n: int | None, types: list[str] | None = None) -> list[Question]:
    """The first ``n`` questions round-robin over the types (in file order); all of them when n is None.

    ``types`` keeps only questions of those types (ValueError for a type the file does not have).
    """
    if types:
        unknown = sorted(set(types) - {q.question_type for q in questions})
        if unknown:
            raise ValueError(f"no questions of type {', '.join(unknown)}")
        questions = [q for q in questions if q.question_type in types]
    if n is None or n >= len(questions):
        return list(questions)
    by_type: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        by_type[q.question_type].append(q)
    picked: list[Question] = []
    rank = 0
    while len(picked) < n:
        picked.extend(group[rank] for group in by_type.values() if rank < len(group))
        rank += 1
    chosen = {id(q) for q in picked[:n]}
    return [q for q in questions if id(q) in chosen]


# --------------------------------------------------------------------------- scoring
def memory_block(messages: list[dict[str, Any]]) -> str | None:
    """The content of the prompt's memory block (the system message starting with MEMORY_HEADER), if any."""
    from services.chat_ai.prompt import MEMORY_HEADER

    for m in messages:
        content = m.get("content")
        if m.get("role") == "system" and isinstance(content, str) and content.startswith(MEMORY_HEADER):
            return content
    return None


def score(q: Question, block: str | None) -> dict[str, Any]:
    """What of the question's evidence the block holds (see the module docstring)."""
    from services.chat_ai.prompt import contains_turn, count_tokens, norm

    text = block or ""
    evidence = [{"session_id": t.session_key, "turn": t.index, "role": t.role,
                 "found": contains_turn(text, t.content)} for t in q.evidence]
    sessions_of: dict[str, set[str]] = defaultdict(set)
    for t in q.turns:
        sessions_of[norm(t.content)].add(t.session_id)
    found_sessions = sorted({
        t.session_id for t in q.turns
        if t.session_id in q.answer_sessions and len(norm(t.content)) >= MIN_SESSION_MARKER_CHARS
        and sessions_of[norm(t.content)] == {t.session_id} and contains_turn(text, t.content)})
    hits = [e["found"] for e in evidence]
    return {
        "evidence_turn_any": any(hits) if hits else None,
        "evidence_turn_all": all(hits) if hits else None,
        "evidence_session_any": bool(found_sessions) if q.answer_sessions else None,
        "evidence_turns": evidence,
        "evidence_sessions_found": found_sessions,
        "memory_block": block is not None,
        "memory_block_tokens": count_tokens(text),
    }


def _rate(values: list[Any]) -> float | None:
    known = [bool(v) for v in values if v is not None]
    return round(sum(known) / len(known), 4) if known else None


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else 0.0


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = [r["memory_block_tokens"] for r in rows]
    ltm = Counter(r["ltm"] for r in rows)
    latency = [r["latency_ms"] for r in rows if r["latency_ms"] is not None]
    wall = [r["wall_ms"] for r in rows if r["wall_ms"] is not None]
    out: dict[str, Any] = {
        "questions": len(rows),
        "evidence_turn_any": _rate([r["evidence_turn_any"] for r in rows]),
        "evidence_turn_all": _rate([r["evidence_turn_all"] for r in rows]),
        "evidence_session_any": _rate([r["evidence_session_any"] for r in rows]),
        "memory_blocks": sum(1 for r in rows if r["memory_block"]),
        "memory_block_tokens": {"mean": round(sum(tokens) / len(tokens), 1) if tokens else 0.0,
                                "p95": _pct(tokens, 0.95), "max": max(tokens, default=0)},
        "ltm": {s: ltm.get(s, 0) for s in LTM_STATUSES},
        "timeouts": ltm.get("timeout", 0),
        "latency_ms": {"p50": _pct(latency, 0.50), "p95": _pct(latency, 0.95)},
        "wall_ms": {"p50": _pct(wall, 0.50), "p95": _pct(wall, 0.95)},
    }
    if any(r.get("judge") for r in rows):
        out["qa_accuracy"] = _rate([r["judge"]["correct"] for r in rows if r.get("judge")])
    return out


def report(rows: list[dict[str, Any]], config: dict[str, Any], ingest: dict[str, Any]) -> dict[str, Any]:
    types = list(dict.fromkeys(r["question_type"] for r in rows))
    return {
        "summary": {**summarise(rows), **ingest},
        "per_type": {t: summarise([r for r in rows if r["question_type"] == t]) for t in types},
        "config": config,
        "questions": rows,
    }


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("evidence_turn_any", "evidence turn (any)"), ("evidence_turn_all", "evidence turn (all)"),
            ("evidence_session_any", "evidence session (any)")]
    if "qa_accuracy" in result["summary"]:
        bars.append(("qa_accuracy", f"QA accuracy ({result['config'].get('judge_model')})"))
    groups = [*result["per_type"].items(), ("all", result["summary"])]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(bars)
    for j, (key, label) in enumerate(bars):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [g.get(key) or 0.0 for _, g in groups], width, label=label)
    ax.set_xticks(range(len(groups)), [f"{name.replace('single-session-', 'ss-')}\n(n={g['questions']})"
                                       for name, g in groups])
    ax.set_ylim(0, 1.2)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("share of questions")
    s = result["summary"]
    ax.set_title(f"LongMemEval, evidence in chat_ai's prompt ({result['config'].get('backend')} backend): "
                 f"block {s['memory_block_tokens']['mean']:.0f} tokens mean, {s['timeouts']} ltm timeouts")
    ax.legend(loc="upper center", ncol=len(bars), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line
def add_parser(sub: Any) -> None:
    p = sub.add_parser("longmemeval", help="LongMemEval: evidence in chat_ai's prompt, through the real services",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="a file in LongMemEval's format")
    p.add_argument("--out", required=True, type=Path, help="the JSON report (.png chart and .prompts.jsonl beside it)")
    p.add_argument("--backend", choices=("native", "mem0"), default="native", help="LTM_BACKEND of the ltm workers")
    p.add_argument("--ltm-workers", type=int, default=2, help="ltm processes (ingest is the slow part; default 2)")
    p.add_argument("--questions", type=int, help="only N questions, round-robin over the question types")
    p.add_argument("--ids", help="only these question ids (comma-separated)")
    p.add_argument("--types", nargs="+", metavar="TYPE", help="only questions of these types "
                                                            "(e.g. single-session-preference)")
    p.add_argument("--run-dir", type=Path, help="service logs (default .data/eval-longmemeval/<run id>)")
    p.add_argument("--run-id", help="names the run's users and bus prefix (default: random); with --keep, a "
                                    "second run with the same id reuses what was imported")
    p.add_argument("--reply-timeout", type=float, default=120.0, help="seconds to wait for each reply")
    p.add_argument("--judge-model", help="model that grades answers when an LLM is configured (default LLM_MODEL)")
    p.add_argument("--no-llm", action="store_true", help="record prompts only, even when OPENAI_* is set")
    p.add_argument("--no-memory-embed", dest="memory_embed", action="store_false",
                   help="the memory service embeds nothing (MEMORY_EMBED_MESSAGES=false): ltm embeds every turn "
                        "itself (by default memory embeds each message as it is imported and the vector is carried "
                        "to ltm, as deployed)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="questions asked at once, each by its own user, the next as soon as one is answered (default "
                        "1: one after another); e.g. 10 for ten people chatting at the same time")
    p.add_argument("--keep", action="store_true", help="keep the run's users, sessions and bus keys")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from mesh.longmemeval_run import RunOptions, evaluate

    if not args.data.is_file():
        raise SystemExit(f"no such file: {args.data}")
    if args.ltm_workers < 1:
        raise SystemExit("--ltm-workers must be at least 1")
    if args.concurrency < 1:
        raise SystemExit("--concurrency must be at least 1")
    try:
        questions = load(args.data)
        if args.ids:
            wanted = {i.strip() for i in args.ids.split(",") if i.strip()}
            if wanted - {q.question_id for q in questions}:
                raise ValueError(f"no question {', '.join(sorted(wanted - {q.question_id for q in questions}))}")
            questions = [q for q in questions if q.question_id in wanted]
        questions = select(questions, args.questions, args.types)
    except (ValueError, json.JSONDecodeError) as exc:
        raise SystemExit(f"cannot read {args.data}: {exc}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    prompts = args.out.with_suffix(".prompts.jsonl")
    options = RunOptions(data=args.data, backend=args.backend, ltm_workers=args.ltm_workers, run_id=args.run_id,
                         run_dir=args.run_dir, reply_timeout=args.reply_timeout, judge_model=args.judge_model,
                         use_llm=not args.no_llm, memory_embed=args.memory_embed, keep=args.keep,
                         progress=not args.no_progress, prompts=prompts, concurrency=args.concurrency)
    rows, config, ingest = evaluate(questions, options)
    result = report(rows, config, ingest)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    png = args.out.with_suffix(".png")
    chart(result, png)
    s = result["summary"]
    qa = f", QA accuracy {s['qa_accuracy']} ({config['judge_model']})" if "qa_accuracy" in s else ""
    print(f"longmemeval ({config['backend']}, {s['questions']} questions, {args.concurrency} at once): evidence "
          f"turn any {s['evidence_turn_any']}, all {s['evidence_turn_all']}, session any {s['evidence_session_any']}, "
          f"block {s['memory_block_tokens']['mean']} tokens mean, ltm {s['ltm']}{qa}; ingest "
          f"{s['ingest_per_s']} updates/s -> {args.out}, {png}, {prompts}")
    return 0
