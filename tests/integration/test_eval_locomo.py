"""``mesh eval locomo`` end to end on a small LoCoMo-format file, on the real servers and through the bus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.__main__ import main
from mesh.eval_locomo import Outcome, load, parse_evidence, pick, report, shown
from shared.contracts import Memory, MemorySource
from shared.contracts.messages import ContextTurn

FILLER = ["Hi, how are you?", "Good, thanks. Busy week at work.", "Same here, lots of meetings.",
          "Did you watch the game?", "No, I missed it.", "It was a close one."]


def conversation(sample_id: str, a: str, b: str, facts: list[str]) -> dict:  # type: ignore[type-arg]
    conv: dict[str, object] = {"speaker_a": a, "speaker_b": b}
    for s, fact in enumerate(facts, start=1):
        turns = [{"speaker": a if i % 2 == 0 else b, "dia_id": f"D{s}:{i + 1}", "text": t}
                 for i, t in enumerate([*FILLER[:3], fact, *FILLER[3:]])]
        turns[1]["blip_caption"] = "a photo of a desk"
        conv[f"session_{s}"] = turns
        conv[f"session_{s}_date_time"] = f"1:56 pm on {s} May, 2023"
    return {"sample_id": sample_id, "conversation": conv}


def dataset() -> list[dict]:  # type: ignore[type-arg]
    one = conversation("c1", "Ann", "Ben", ["I bought a teal kayak and named it Bubbles.",
                                            "My daughter started violin lessons on Tuesday."])
    one["qa"] = [
        {"question": "What did Ben name his kayak?", "answer": "Bubbles", "evidence": ["D1:4"], "category": 4},
        {"question": "When did the violin lessons start?", "answer": "Tuesday", "evidence": ["D:2:4"],
         "category": 2},  # malformed id, still usable
        {"question": "What colour is the kayak, and who takes violin lessons?", "answer": "teal; daughter",
         "evidence": ["D1:4; D2:4"], "category": 1},
        {"question": "What did Ann name her kayak?", "answer": "", "evidence": ["D1:4"], "category": 5},
        {"question": "Unanswerable", "answer": "", "evidence": [], "category": 4},  # skipped
        {"question": "Broken", "answer": "", "evidence": ["nonsense"], "category": 3},  # skipped
    ]
    two = conversation("c2", "Cy", "Di", ["We are moving to Lisbon in the autumn."])
    two["qa"] = [{"question": "Where is Cy moving?", "answer": "Lisbon", "evidence": ["D1:4"], "category": 3}]
    return [one, two]


def test_parse_evidence_tolerates_malformed_ids() -> None:
    assert parse_evidence(["D1:3"]) == {"D1:3"}
    assert parse_evidence(["D:11:26"]) == {"D11:26"}
    assert parse_evidence(["D8:6; D9:17", "D10 : 2"]) == {"D8:6", "D9:17", "D10:2"}
    assert parse_evidence(["", "x", 7, None]) == set() and parse_evidence("D2:1") == {"D2:1"}


def test_recall_counts_results_and_their_context() -> None:
    def memory(mid: str, *context: str) -> Memory:
        return Memory(memory_id=mid, type="episodic", content=mid, created_at=0.0,
                      source=MemorySource(message_id=mid), context=[ContextTurn(message_id=c, content=c)
                                                                    for c in context])

    dia = {f"m{i}": f"D1:{i}" for i in range(1, 30)}
    answer = [memory("m1", "m2"), *(memory(f"m{i}") for i in range(3, 8)), memory("m8", "m9")]
    assert shown(answer, 1, dia, {}) == {"D1:1", "D1:2"}
    assert shown(answer, 7, dia, {}) == {"D1:1", "D1:2", "D1:3", "D1:4", "D1:5", "D1:6", "D1:7", "D1:8", "D1:9"}
    assert shown([memory("x", "y")], 1, dia, {"x": "D1:20"}) == {"D1:20"}  # content fallback
    outcomes = [Outcome(4, {5: True, 10: True, 20: True}, True, 100, 10.0),
                Outcome(4, {5: False, 10: True, 20: True}, False, 300, 20.0),
                Outcome(2, {5: False, 10: False, 20: True}, False, 200, 30.0),
                Outcome(5, {5: True, 10: True, 20: True}, True, 50, 40.0)]
    result = report(outcomes, "native", {})
    assert result["summary"] == {"recall@5_any": 0.3333, "recall@10_any": 0.6667, "recall@20_any": 1.0,
                                 "recall@10_all": 0.3333, "tokens_per_question": 200.0, "questions": 3}
    assert result["per_category"]["4"]["recall@5_any"] == 0.5 and result["per_category"]["2"]["questions"] == 1
    assert result["adversarial"]["questions"] == 1 and set(result["per_category"]) == {"2", "4"}
    assert result["latency_ms"] == {"p50": 30.0, "p95": 40.0}


def test_load_keeps_speakers_dates_and_skips_unusable_questions(tmp_path: Path) -> None:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(dataset()))
    one, two = load(path)
    assert one.skipped == 2 and len(one.questions) == 4 and len(two.questions) == 1
    assert one.turns[0].content == "Ann: Hi, how are you?"
    assert one.turns[1].content.endswith("[shares a photo: a photo of a desk]")
    assert one.turns[1].timestamp == one.turns[0].timestamp + 1
    assert one.turns[7].session_id == "c1:session_2" and one.turns[7].timestamp > one.turns[6].timestamp + 3600
    assert one.questions[2].evidence == {"D1:4", "D2:4"}
    assert [c.sample_id for c in pick([one, two], "1")] == [one.sample_id]  # --conversations N: the first N
    assert [c.sample_id for c in pick([one, two], two.sample_id)] == [two.sample_id]  # or by name
    with pytest.raises(SystemExit):
        pick([one, two], "conv-nope")


def test_report_breaks_recall_down_by_conversation() -> None:
    outcomes = [Outcome(4, {5: True, 10: True, 20: True}, True, 100, 10.0, True, "a"),
                Outcome(4, {5: False, 10: True, 20: True}, False, 300, 20.0, False, "b")]
    result = report(outcomes, "native", {})
    assert result["per_conversation"]["a"]["recall@5_all"] == 1.0
    assert result["per_conversation"]["b"]["recall@10_any"] == 1.0 and result["summary"]["recall@5_all"] == 0.5


@pytest.mark.slow
def test_eval_command_end_to_end(tmp_path: Path, redis_url: str, database_url: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("DATABASE_URL", database_url)
    data, out = tmp_path / "tiny.json", tmp_path / "report.json"
    data.write_text(json.dumps(dataset()))
    assert main(["eval", "locomo", "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"summary", "per_category", "adversarial", "latency_ms", "backend"}
    assert result["backend"] == "native" and result["skipped_questions"] == 2 and result["turns"] == 21
    s = result["summary"]
    assert set(s) == {"recall@5_any", "recall@10_any", "recall@20_any", "recall@10_all", "recall@5_all",
                      "tokens_per_question", "questions"}
    assert set(result["per_conversation"]) == {"c1", "c2"} and len(result["questions"]) == 4
    assert s["questions"] == 4 and result["adversarial"]["questions"] == 1
    # every evidence turn is one of a handful of distinct, keyword-matching turns: all are found
    assert s["recall@10_any"] == 1.0 and s["recall@10_all"] == 1.0
    assert 0 < s["tokens_per_question"] <= 950
    assert set(result["per_category"]) == {"1", "2", "3", "4"}
    assert result["latency_ms"]["p50"] > 0 and result["latency_ms"]["p95"] >= result["latency_ms"]["p50"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_on_a_stacks_server_gets_a_database_of_its_own(pg_admin_url: str) -> None:
    """Reusing a running stack's PostgreSQL, an evaluation works in its own database (created once, dropped
    after unless kept), so the stack's services never see, embed or optimise the run's data."""
    import psycopg

    from mesh.eval_locomo import _drop_database, _own_database

    url = _own_database(pg_admin_url, "mesh_eval_test_own")
    assert url.endswith("/mesh_eval_test_own") and _own_database(pg_admin_url, "mesh_eval_test_own") == url
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("mesh_eval_test_own",)
    _drop_database(url)
    with psycopg.connect(pg_admin_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'mesh_eval_test_own'").fetchone() == (0,)
