"""``mesh eval longmemeval`` on a tiny LongMemEval-format file: the real service processes, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from mesh.__main__ import main
from mesh.eval_longmemeval import load, score, select, summarise
from mesh.longmemeval_judge import Judge, anscheck_prompt
from mesh.recorder import FIXED_REPLY, RecordingServer
from services.chat_ai.prompt import MEMORY_HEADER
from tests.fake_llm import fake_llm

FILLER = [
    ("user", "Can you suggest a good stretching routine for the morning?"),
    ("assistant", "Sure: neck rolls, shoulder circles, a forward fold and a cat-cow stretch, thirty seconds each."),
    ("user", "What is a quick vegetarian dinner I could cook on a weeknight?"),
    ("assistant", "A chickpea curry with spinach takes about twenty minutes and keeps well for lunch."),
]


def session(*turns: tuple[str, str], answer: int | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": r, "content": c} for r, c in turns]
    if answer is not None:
        out[answer]["has_answer"] = True
    return out


def dataset() -> list[dict[str, Any]]:
    tortoise = {
        "question_id": "q_tortoise", "question_type": "single-session-user",
        "question": "What did I name the tortoise I adopted?", "answer": "Biscuit",
        "question_date": "2023/06/02 (Fri) 10:00",
        "haystack_session_ids": ["filler_a", "answer_tortoise", "filler_b"],
        "haystack_dates": ["2023/05/01 (Mon) 09:00", "2023/05/10 (Wed) 18:30", "2023/05/20 (Sat) 12:15"],
        "haystack_sessions": [
            session(*FILLER[:2]),
            session(("user", "I adopted a three-legged tortoise from the shelter and named her Biscuit."),
                    ("assistant", "Congratulations! Tortoises need a warm lamp and a shallow water dish."),
                    ("user", ""),  # an empty turn: skipped, never imported
                    answer=0),
            session(*FILLER[2:]),
        ],
        "answer_session_ids": ["answer_tortoise"],
    }
    assistant = {
        "question_id": "q_assistant", "question_type": "single-session-assistant",
        "question": "Which board game with a lighthouse did you recommend for two players?",
        "answer": "Keeper of the Lamp", "question_date": "2023/06/03 (Sat) 20:00",
        "haystack_session_ids": ["answer_games", "filler_c"],
        "haystack_dates": ["2023/05/05 (Fri) 21:00", "2023/05/06 (Sat) 08:00"],
        "haystack_sessions": [
            session(("user", "Any board game ideas for two players?"),
                    ("assistant", "Try Keeper of the Lamp, a cooperative game about a lighthouse on a stormy coast."),
                    answer=1),
            session(*FILLER),
        ],
        "answer_session_ids": ["answer_games"],
    }
    multi = {
        "question_id": "q_multi", "question_type": "multi-session",
        "question": "How many marathons have I run this year?", "answer": "2",
        "question_date": "2023/06/04 (Sun) 07:00",
        "haystack_session_ids": ["answer_m1", "answer_m2", "filler_d"],
        "haystack_dates": ["2023/02/12 (Sun) 15:00", "2023/04/23 (Sun) 16:00", "2023/05/01 (Mon) 10:00"],
        "haystack_sessions": [
            session(("user", "I just finished the Seville marathon in under four hours!"), answer=0),
            session(("user", "The London marathon today was brutal, but I finished it."), answer=0),
            session(*FILLER[:2]),
        ],
        "answer_session_ids": ["answer_m1", "answer_m2"],
    }
    return [tortoise, assistant, multi]


def test_load_dates_sessions_and_round_robin_selection(tmp_path: Path) -> None:
    path = tmp_path / "tiny.json"
    data = dataset()
    data.append({**data[0], "question_id": "q_second_user", "haystack_session_ids": ["s", "s", "t"]})
    path.write_text(json.dumps(data))
    questions = load(path)
    tortoise = questions[0]
    assert tortoise.skipped_turns == 1 and len(tortoise.turns) == 6
    assert tortoise.asked_at == 1685700000.0  # 2023-06-02 10:00 UTC
    first, second = tortoise.turns[2], tortoise.turns[3]
    assert first.session_key == "answer_tortoise" and second.timestamp == first.timestamp + 1
    assert [t.content for t in tortoise.evidence] == [first.content]
    assert [t.session_key for t in questions[3].turns][:4] == ["s", "s", "s#2", "s#2"]  # a repeated session id
    # round-robin over the types, in file order: one of each type first
    assert [q.question_id for q in select(questions, 3)] == ["q_tortoise", "q_assistant", "q_multi"]
    assert [q.question_id for q in select(questions, 4)] == ["q_tortoise", "q_assistant", "q_multi", "q_second_user"]
    assert [q.question_id for q in select(questions, None, ["multi-session"])] == ["q_multi"]
    with pytest.raises(ValueError, match="no questions of type temporal"):
        select(questions, None, ["temporal"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question_id": "x"}]))
    with pytest.raises(ValueError, match="no question, haystack_sessions"):
        load(bad)


def test_score_finds_turns_and_sessions_in_the_block(tmp_path: Path) -> None:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(dataset()))
    multi = load(path)[2]
    block = (f"{MEMORY_HEADER}\n- 2023-02-12 (Sun), user: I just finished the Seville marathon in under four hours!"
             f"\n  2023-05-01 (Mon), user: Can you suggest a good stretching routine for the morning?")
    found = score(multi, block)
    assert found["evidence_turn_any"] is True and found["evidence_turn_all"] is False
    assert found["evidence_session_any"] is True and found["evidence_sessions_found"] == ["answer_m1"]
    assert [e["found"] for e in found["evidence_turns"]] == [True, False]
    assert 0 < found["memory_block_tokens"] < 80 and found["memory_block"] is True
    nothing = score(multi, None)
    assert nothing["evidence_turn_any"] is False and nothing["memory_block_tokens"] == 0
    rows = [{**found, "question_type": "multi-session", "ltm": "hit", "latency_ms": 10.0, "wall_ms": 12.0},
            {**nothing, "question_type": "multi-session", "ltm": "timeout", "latency_ms": 30.0, "wall_ms": 31.0}]
    s = summarise(rows)
    assert s["evidence_turn_any"] == 0.5 and s["evidence_turn_all"] == 0.0 and s["timeouts"] == 1
    assert s["ltm"] == {"hit": 1, "miss": 0, "timeout": 1, "error": 0, "disabled": 0, "no_reply": 0}
    assert s["memory_block_tokens"]["max"] == found["memory_block_tokens"] and s["latency_ms"]["p50"] == 30.0


async def test_recorder_proxies_and_the_judge_grades() -> None:
    def upstream(request: dict[str, Any]) -> str:
        prompt = request["messages"][-1]["content"]
        return "yes" if "Correct Answer: Biscuit" in prompt and "Biscuit" in prompt.split("Model Response:")[1] \
            else ("no" if "Correct Answer" in prompt else "the model's answer")

    with fake_llm(upstream) as (base_url, seen), RecordingServer(base_url, "k") as rec:
        body = {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient() as http:
            resp = await http.post(f"{rec.url}/chat/completions", json=body)
            missing = await http.post(f"{rec.url}/models", json={})
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "the model's answer"
        assert missing.status_code == 404 and seen == [body]
        record = rec.find("hi")
        assert record is not None and record.upstream and record.reply == "the model's answer"
        judge = Judge("k", base_url, "judge-m")
        right = await judge.grade("q1", "single-session-user", "Name?", "Biscuit", "She is called Biscuit.")
        wrong = await judge.grade("q1", "single-session-user", "Name?", "Biscuit", "Cookie.")
        await judge.close()
        assert right.correct and not wrong.correct and seen[-1]["model"] == "judge-m"
    with RecordingServer() as rec:
        async with httpx.AsyncClient() as http:
            resp = await http.post(f"{rec.url}/chat/completions", json=body)
        assert resp.json()["choices"][0]["message"]["content"] == FIXED_REPLY and rec.count() == 1
    assert "do not penalize off-by-one errors" in anscheck_prompt("temporal-reasoning", "q", "a", "r",
                                                                  abstention=False)
    assert "Rubric: a" in anscheck_prompt("single-session-preference", "q", "a", "r", abstention=False)
    assert "unanswerable" in anscheck_prompt("multi-session", "q", "a", "r", abstention=True)


@pytest.mark.slow
def test_eval_command_end_to_end(tmp_path: Path, redis_url: str, database_url: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("DATABASE_URL", database_url)
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    data, out = tmp_path / "tiny.json", tmp_path / "report.json"
    data.write_text(json.dumps(dataset()))
    assert main(["eval", "longmemeval", "--data", str(data), "--out", str(out), "--ltm-workers", "1",
                 "--run-dir", str(tmp_path / "run"), "--run-id", "t1", "--no-progress", "--concurrency", "3"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"summary", "per_type", "config", "questions"}
    s = result["summary"]
    assert {"evidence_turn_any", "evidence_turn_all", "evidence_session_any", "memory_block_tokens", "timeouts",
            "questions", "ingest_per_s", "import_per_s", "ltm", "latency_ms", "wall_ms"} <= set(s)
    turns = sum(len([t for t in sess if t["content"]]) for q in dataset() for sess in q["haystack_sessions"])
    assert s["questions"] == 3 and s["haystack_turns"] == turns == 16
    assert s["imported"] == turns and s["duplicates"] == 0 and s["updates_published"] == turns
    assert s["sessions"] == 8 and s["ingest_dead_letters"] == 0 and s["ingest_per_s"] > 0
    assert sum(s["ltm"].values()) == 3 and s["ltm"]["no_reply"] == 0
    assert set(result["per_type"]) == {"single-session-user", "single-session-assistant", "multi-session"}
    assert sum(t["questions"] for t in result["per_type"].values()) == 3
    config = result["config"]
    assert config["llm"] == "recording" and config["judge_model"] is None and config["ltm_workers"] == 1
    assert config["concurrency"] == 3  # the three questions asked at once; rows and prompts in question order
    assert config["chat_ai"]["ltm_timeout_ms"] > 0 and config["backend"] == "native"
    rows = {r["question_id"]: r for r in result["questions"]}
    assert set(rows) == {"q_tortoise", "q_assistant", "q_multi"}
    for r in rows.values():
        assert r["reply"] == FIXED_REPLY and r["prompt_recorded"] and "qa_accuracy" not in s
        assert len(r["evidence_turns"]) == (2 if r["question_id"] == "q_multi" else 1)
        assert r["memory_block_tokens"] <= s["memory_block_tokens"]["max"]
    # a unique fact asked directly: its turn is in the prompt's memory block
    tortoise = rows["q_tortoise"]
    assert tortoise["memory_block"] and tortoise["evidence_turn_any"] and tortoise["memory_block_tokens"] > 0
    assert tortoise["evidence_sessions_found"] == ["answer_tortoise"]
    prompts = [json.loads(line) for line in out.with_suffix(".prompts.jsonl").read_text().splitlines()]
    assert [p["question_id"] for p in prompts] == ["q_tortoise", "q_assistant", "q_multi"]
    assert prompts[0]["messages"][-1] == {"role": "user", "content": "What did I name the tortoise I adopted?"}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (tmp_path / "run").glob("*.log")} == {"memory.log", "ltm-1.log", "chat_ai.log"}
    # the run cleans up after itself: no bus keys, no users left in either store
    assert asyncio.run(_keys(redis_url, "lme:t1:*")) == []
    with psycopg.connect(database_url) as conn:
        for table in ("conversation_sessions", "conversation_messages", "ltm_memories"):
            row = conn.execute(f"SELECT count(*) FROM {table} WHERE user_id LIKE 'lme-%'").fetchone()
            assert row is not None and row[0] == 0, table


async def _keys(redis_url: str, pattern: str) -> list[bytes]:
    from shared.runtime.runner import redis_client

    client = redis_client(redis_url)
    try:
        return [k async for k in client.scan_iter(match=pattern)]
    finally:
        await client.aclose()
