"""``mesh eval docs``: recall@k of document search on a labelled set, through the bus.

The set (default ``tests/data/docs/``): the documents of a directory (text, Markdown, HTML; not ``README.md``)
and ``questions.jsonl`` beside them, one question a line: ``{"id", "question", "doc", "answer"}`` where ``doc``
is a file name of the directory and ``answer`` a span of that document's text. The documents are added with
``doc_add`` for a user of the run's own, each question is asked with ``doc_search`` (``top_k`` = k), and a question
counts as recalled when one of the k passages comes from its document and contains the span (case and
whitespace aside). The run's documents are deleted at the end. It needs a running mesh (``make up``) or
``REDIS_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.docs import SUFFIXES, Call, add, delete, search
from shared.contracts import new_id
from shared.contracts.messages import DocPassage

DEFAULT_SET = Path(__file__).resolve().parent.parent / "tests" / "data" / "docs"
_WS = re.compile(r"\s+")


def norm(text: str) -> str:
    return _WS.sub(" ", text).strip().casefold()


@dataclass(frozen=True, slots=True)
class Question:
    id: str
    question: str
    doc: str
    answer: str


def load_set(directory: Path) -> tuple[list[Path], list[Question]]:
    """The set's documents and its questions."""
    docs = sorted(p for p in directory.iterdir()
                  if p.is_file() and p.suffix.lower() in SUFFIXES and p.name.lower() != "readme.md")
    questions = [Question(**json.loads(line)) for line in
                 (directory / "questions.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    names = {p.name for p in docs}
    unknown = sorted({q.doc for q in questions} - names)
    if unknown:
        raise ValueError(f"questions name documents that are not in {directory}: {unknown}")
    return docs, questions


def recalled(question: Question, passages: list[DocPassage], k: int) -> int | None:
    """The rank (from 1) of the first of the top ``k`` passages from the question's document holding its answer."""
    want = norm(question.answer)
    for rank, p in enumerate(passages[:k], start=1):
        if Path(p.source).name == question.doc and want in norm(p.text):
            return rank
    return None


async def evaluate(call: Call, directory: Path = DEFAULT_SET, k: int = 5, user_id: str | None = None,
                   keep: bool = False) -> dict[str, Any]:
    """Add the set's documents for ``user_id`` (default: a fresh one), ask every question, report recall@k."""
    docs, questions = load_set(directory)
    user = user_id or f"eval-docs-{new_id()[:8]}"
    started = time.perf_counter()
    chunks = 0
    for path in docs:
        chunks += (await add(call, user, path, source=path.name)).chunks
    added_s = time.perf_counter() - started
    rows: list[dict[str, Any]] = []
    latencies: list[float] = []
    try:
        for q in questions:
            t = time.perf_counter()
            passages = await search(call, user, q.question, top_k=k)
            latencies.append((time.perf_counter() - t) * 1000)
            rank = recalled(q, passages, k)
            rows.append({"id": q.id, "doc": q.doc, "rank": rank,
                         "top": [f"{Path(p.source).name}: {p.label}" for p in passages[:k]]})
    finally:
        if not keep:
            await delete(call, user, None)
    hits = [r for r in rows if r["rank"] is not None]
    per_doc: dict[str, list[int]] = {}
    for r in rows:
        per_doc.setdefault(r["doc"], [0, 0])
        per_doc[r["doc"]][0] += r["rank"] is not None
        per_doc[r["doc"]][1] += 1
    ordered = sorted(latencies)
    return {
        "k": k, "questions": len(rows), "recalled": len(hits),
        f"recall_at_{k}": round(len(hits) / len(rows), 4) if rows else 0.0,
        "recall_at_1": round(sum(1 for r in hits if r["rank"] == 1) / len(rows), 4) if rows else 0.0,
        "mrr": round(sum(1 / r["rank"] for r in hits) / len(rows), 4) if rows else 0.0,
        "documents": len(docs), "chunks": chunks, "add_s": round(added_s, 2),
        "search_ms_p50": round(ordered[len(ordered) // 2], 1) if ordered else 0.0,
        "per_document": {d: f"{h}/{n}" for d, (h, n) in sorted(per_doc.items())},
        "misses": [r for r in rows if r["rank"] is None],
        "results": rows,
    }


def add_parser(sub: Any) -> None:
    p = sub.add_parser("docs", help="recall@k of document search on a labelled set (tests/data/docs), over the bus",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", type=Path, default=DEFAULT_SET, dest="docs_set",
                   help="directory of documents with questions.jsonl (default tests/data/docs)")
    p.add_argument("--k", type=int, default=5, help="passages per question (default 5)")
    p.add_argument("--out", type=Path, help="write the JSON report here too")


async def _run(args: argparse.Namespace) -> int:
    from mesh.client import MeshClient

    client = await MeshClient.connect()
    try:
        await client.wait_for_ltm()
        report = await evaluate(client.ltm.call, args.docs_set, args.k)
    finally:
        await client.close()
    k = args.k
    print(f"recall@{k}: {report[f'recall_at_{k}']:.3f} ({report['recalled']}/{report['questions']}), "
          f"recall@1 {report['recall_at_1']:.3f}, MRR {report['mrr']:.3f}; {report['documents']} documents, "
          f"{report['chunks']} chunks; search p50 {report['search_ms_p50']} ms")
    for miss in report["misses"]:
        print(f"  missed {miss['id']} ({miss['doc']}): top {miss['top']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
