"""``mesh bench``'s machinery at a tiny size: real service processes over real Redis and PostgreSQL.

Only the shape of the report is checked (every workload ran, every summary figure is there with its
target); how fast anything is belongs to ``make bench``, never to a test.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mesh.bench import run_report
from mesh.bench_report import readme_block
from mesh.bench_seed import load_corpus, prepare
from mesh.bench_spec import TARGETS, tiny

NAMES = ["Ann", "Ben"]
THINGS = ["a teal kayak", "violin lessons", "the Lisbon trip", "a sourdough starter", "the night shift",
          "a vintage camera", "the climbing gym", "Japanese classes", "a rescue dog", "the garden beds"]
VERBS = ["bought", "started", "planned", "talked about", "loved", "gave up on"]


def locomo_file(path: Path) -> Path:
    turns = [{"speaker": NAMES[i % 2], "dia_id": f"D1:{i + 1}",
              "text": f"Last week I {VERBS[i % len(VERBS)]} {THINGS[i % len(THINGS)]} with my friend number {i}."}
             for i in range(40)]
    qa = [{"question": f"What did {NAMES[i % 2]} say about {THINGS[i % len(THINGS)]}?", "answer": "x",
           "evidence": [f"D1:{i + 1}"], "category": 4} for i in range(20)]
    sample = {"sample_id": "tiny", "conversation": {"speaker_a": "Ann", "speaker_b": "Ben", "session_1": turns,
                                                    "session_1_date_time": "1:56 pm on 8 May, 2023"}, "qa": qa}
    path.write_text(json.dumps([sample]), encoding="utf-8")
    return path


def longmemeval_file(path: Path) -> Path:
    sessions = [[{"role": "user", "content": f"Can you help me plan {t}? I have a long list of questions about it."},
                 {"role": "assistant", "content": f"Of course. Planning {t} starts with a budget. " * 8}]
                for t in THINGS[:4]]
    item = {"question_id": "q1", "question": "What did I ask you to help me plan?", "answer": "x",
            "haystack_dates": ["2023/05/20 (Sat) 02:21"] * len(sessions), "haystack_sessions": sessions}
    path.write_text(json.dumps([item]), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_bench_runs_every_workload_as_processes_over_the_bus(tmp_path: Path, redis_url: str,
                                                              pg_admin_url: str) -> None:
    spec = tiny(locomo_file(tmp_path / "locomo.json"), longmemeval_file(tmp_path / "lme.json"))
    out = tmp_path / "results" / "tiny.json"
    try:
        report = run_report(spec, out, data_dir=tmp_path / "data", urls=(redis_url, pg_admin_url))
        again = asyncio.run(prepare(pg_admin_url, "mesh_bench_tiny", spec.seed,
                                    load_corpus(spec.locomo, spec.longmemeval, spec.seed.pool_size), tmp_path / "data"))
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS mesh_bench_tiny WITH (FORCE)")

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert {"generated_at", "machine", "config", "results", "summary", "plots", "servers"} <= report.keys()
    assert {"cpu", "cores", "python", "packages"} <= report["machine"].keys()
    assert report["servers"]["redis"] and report["servers"]["pgvector"]
    assert again[1]["reused"] is True and report["results"]["seed"]["rows"] == spec.seed.rows() == 30 + 120 + 3 * 30

    summary: dict[str, Any] = report["summary"]
    required = {"search_p95_ms_10k", "search_qps_8_10k", "search_p95_ms_8_10k", "chat_p95_ms_50",
                "chat_without_memory_50", "ingest_per_s_1", "ingest_per_s_1_long", "ingest_scale_2",
                "search_p95_ratio_ingesting", "ready_s", "search_p95_ms_10k_mem0"}
    assert required <= summary.keys() == {t.key for t in TARGETS}
    for row in summary.values():
        assert {"value", "target", "met", "unit", "what"} <= row.keys()
    for key in ("chat_without_memory_50", "ingest_per_s_1", "ingest_per_s_1_long", "ingest_scale_2",
                "search_p95_ratio_ingesting", "ready_s"):  # measured at any size
        assert summary[key]["value"] is not None and isinstance(summary[key]["met"], bool), key

    r = report["results"]
    for size in ("30", "120"):
        single = r["search"]["single"][size]
        assert single["n"] == spec.single_searches and single["errors"] == single["timeouts"] == 0
        assert single["memories"] == int(size) and single["p95_ms"] > 0
        assert [int(n) for n in r["search"]["concurrency"][size]] == list(spec.concurrency)
    assert set(r["search"]["processes"]) == {"1", "2"}
    ingesting = r["search"]["ingesting"]
    assert ingesting["quiet"]["n"] == spec.ingesting_searches and ingesting["ingesting"]["n"] >= 1
    assert ingesting["ingested_meanwhile"] + ingesting["queued_at_end"] == ingesting["backlog"] == 30
    assert r["mem0"]["seeding"]["30"]["memories"] == 30 and r["mem0"]["single"]["30"]["n"] == spec.mem0_searches
    assert r["mem0"]["ratios"]["30"]["p95"] > 0
    chat = r["mesh"]["chat"]
    assert chat["turn"]["n"] == spec.chat_sessions * spec.chat_turns and chat["no_reply"] == 0
    # where the burst's CPU went: each service's process tree, PostgreSQL (the bench's own), Redis, the bench
    assert set(chat["cpu"]["cores"]) == {"chat_ai", "ltm", "memory", "postgres", "redis", "bench"}, chat["cpu"]
    assert chat["cpu"]["cpu_ms_per_turn"]["chat_ai"] > 0 and chat["cpu"]["cores_total"] > 0
    paced = r["mesh"]["chat_paced"]
    assert paced["think_s"] == spec.chat_think_s > 0 and chat["think_s"] == 0
    assert paced["turn"]["n"] == spec.chat_sessions * spec.chat_paced_turns and paced["no_reply"] == 0
    assert r["mesh"]["chat_paced_backlog_s"] >= 0 and r["mesh"]["memory_backlog_s"] >= 0
    assert report["summary"]["chat_p95_ms_50_paced"]["value"] == paced["turn"]["p95_ms"]
    assert {s: len(v["samples_s"]) for s, v in r["mesh"]["ready"].items()} == {"ltm": 1, "memory": 1, "chat_ai": 1}
    ops = {row["operation"]: row for row in r["mesh"]["memory"]}
    assert ops["rehydration"]["n"] == spec.memory_reps and ops["message_store_first_turns"]["n"] == spec.memory_turns
    for kind, n in (("short", spec.ingest_short), ("long", spec.ingest_long)):
        assert r["ingest"][kind]["1"]["ingested"] == r["ingest"][kind]["2"]["ingested"] == n
        assert r["ingest"][kind]["uncarried"]["ingested"] == n and r["ingest"][kind]["1"]["vectors_carried"]
        assert not r["ingest"][kind]["uncarried"]["vectors_carried"]
        assert r["ingest"][kind]["1"]["cpu"]["cpu_ms_per_update"]["ltm"] > 0  # the ltm process and its ingest child
    both = spec.ingest_short + spec.ingest_long  # ltm stored the carried vectors, embedded none of those turns
    assert r["ingest"]["vectors_used"] == {"1": both, "2": both, "uncarried": 0}
    assert len(report["plots"]) == 2 and all((out.parent / p).stat().st_size > 0 for p in report["plots"])
    assert "| figure | measured | target | met |" in readme_block(report, "tiny.json")
