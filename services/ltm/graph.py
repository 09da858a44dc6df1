"""The knowledge graph (the medium-term tier) and the write path of extracted memories.

On ingest, in the same transaction as the turn's episodic memory and the idempotency record, :func:`write_knowledge`
stores the typed memories extracted from the turn (a repeat of the same statement adds a mention and its
provenance instead of a row), upserts their entities (the speaker is one), the relations between them
(speaker --likes/lives_in/works_at...--> object), and the links memory ↔ entity; then it re-resolves the
supersession of every single-valued slot the turn touched (:func:`services.ltm.lifecycle.supersede`).

:func:`search_entities` serves the ``search_entities`` request: entities of one user ranked by name match and
embedding similarity, each with its relations and the memories that mention it.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from services.ltm.extraction import Extracted
from services.ltm.lifecycle import KEEP_SOURCES, supersede
from services.ltm.store import content_hash

_WS = re.compile(r"\s+")
_LEADING_DET = re.compile(r"^(?:the|a|an|my|his|her|their|our)\s+", re.I)


def norm_name(name: str) -> str:
    return _LEADING_DET.sub("", _WS.sub(" ", name.strip().lower())).strip(" .,!?;:'\"")


@dataclass(slots=True)
class Provenance:
    message_id: str
    session_id: str | None
    timestamp: float
    speaker: str

    def as_json(self) -> dict[str, Any]:
        return {"message_id": self.message_id, "session_id": self.session_id, "timestamp": self.timestamp,
                "speaker": self.speaker}


@dataclass(slots=True)
class TurnKnowledge:
    """What one turn adds: its typed memories (with embeddings) and the vectors of the entity names."""

    user_id: str
    subject: str
    source: Provenance
    items: list[tuple[Extracted, np.ndarray]]
    entity_vectors: dict[str, np.ndarray]
    episodic_hash: str
    episodic_entities: list[tuple[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


TYPED_INSERT = (
    "INSERT INTO ltm_memories (memory_id, user_id, type, content, content_hash, embedding, confidence, entities,"
    " source_message_id, source_session_id, source_timestamp, speaker, meta, subject, slot, slot_value,"
    " valid_from, asserted_at, sources)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (user_id, type, content_hash) DO UPDATE SET"
    " confidence = GREATEST(ltm_memories.confidence, EXCLUDED.confidence),"
    " mentions = ltm_memories.mentions + 1,"
    " sources = jsonb_path_query_array(ltm_memories.sources || EXCLUDED.sources,"
    f" '$[last - {KEEP_SOURCES - 1} to last]'),"
    " valid_from = LEAST(ltm_memories.valid_from, EXCLUDED.valid_from),"
    " asserted_at = GREATEST(ltm_memories.asserted_at, EXCLUDED.asserted_at),"
    " subject = COALESCE(ltm_memories.subject, EXCLUDED.subject),"
    " slot = COALESCE(ltm_memories.slot, EXCLUDED.slot),"
    " slot_value = COALESCE(ltm_memories.slot_value, EXCLUDED.slot_value)"
    " RETURNING memory_id"
)

ENTITY_UPSERT = (
    "INSERT INTO ltm_entities (entity_id, user_id, name, name_norm, type, embedding, first_seen, last_seen)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (user_id, name_norm) DO UPDATE SET mentions = ltm_entities.mentions + 1,"
    " first_seen = LEAST(ltm_entities.first_seen, EXCLUDED.first_seen),"
    " last_seen = GREATEST(ltm_entities.last_seen, EXCLUDED.last_seen),"
    " type = CASE WHEN ltm_entities.type = 'thing' THEN EXCLUDED.type ELSE ltm_entities.type END"
    " RETURNING entity_id"
)

RELATION_UPSERT = (
    "INSERT INTO ltm_relations (relation_id, user_id, subject_id, predicate, object_id, strength, confidence,"
    " valid_from, memory_id) VALUES (%s, %s, %s, %s, %s, 1.0, %s, %s, %s)"
    " ON CONFLICT (user_id, subject_id, predicate, object_id) DO UPDATE SET"
    " strength = ltm_relations.strength + 1.0,"
    " confidence = GREATEST(ltm_relations.confidence, EXCLUDED.confidence),"
    " valid_from = LEAST(ltm_relations.valid_from, EXCLUDED.valid_from),"
    " valid_to = NULL, memory_id = EXCLUDED.memory_id"
)


def slot_value(item: Extracted) -> str | None:
    """The value a slot memory sets, without a leading article ("a nurse" -> "nurse")."""
    if not item.slot or not item.object:
        return None
    return re.sub(r"^(?:a|an|the)\s+", "", item.object.strip(), flags=re.I) or item.object


def item_entities(item: Extracted) -> list[tuple[str, str]]:
    """The entities a memory names: NER entities in it, and the object of its relation."""
    out = list(item.entities)
    if item.object and item.predicate and item.type != "entity":
        out.append((item.object, item.object_type or "thing"))
    return out


def entity_names(items: list[Extracted], subject: str) -> list[tuple[str, str]]:
    """Every distinct (name, type) a turn's memories mention, the speaker first."""
    seen: dict[str, tuple[str, str]] = {norm_name(subject): (subject, "person")}
    for it in items:
        for name, kind in item_entities(it):
            key = norm_name(name)
            if key and len(key) <= 200 and key not in seen:
                seen[key] = (name, kind)
    return list(seen.values())


async def write_knowledge(conn: AsyncConnection, k: TurnKnowledge) -> list[str]:
    """Store one turn's typed memories, entities, relations and links (inside the ingest transaction)."""
    src = k.source
    # a fixed order (by table, then key) so that concurrent ingests never wait on each other in a cycle
    items = sorted(k.items, key=lambda x: (x[0].type, content_hash(x[0].content)))
    memory_ids: list[uuid.UUID] = []
    for item, vec in items:
        meta = {**k.meta, "extraction": item.method}
        if item.predicate:
            meta["predicate"] = item.predicate
        if item.object:
            meta["object"] = item.object
        if item.event_date:
            meta["event_date"] = item.event_date
        cur = await conn.execute(TYPED_INSERT, (
            uuid.uuid4(), k.user_id, item.type, item.content, content_hash(item.content), vec, item.confidence,
            [n for n, _ in item_entities(item)], src.message_id, src.session_id, src.timestamp, src.speaker,
            Jsonb(meta), k.subject, item.slot, slot_value(item), src.timestamp, src.timestamp,
            Jsonb([src.as_json()]),
        ))
        row = await cur.fetchone()
        assert row is not None
        memory_ids.append(row[0])

    names = entity_names([i for i, _ in items], k.subject)
    for name, kind in k.episodic_entities:
        if norm_name(name) not in {norm_name(n) for n, _ in names}:
            names.append((name, kind))
    entity_ids: dict[str, uuid.UUID] = {}
    for name, kind in sorted(names, key=lambda nk: norm_name(nk[0])):
        key = norm_name(name)
        if not key or key not in k.entity_vectors:
            continue
        cur = await conn.execute(ENTITY_UPSERT, (uuid.uuid4(), k.user_id, name, key, kind, k.entity_vectors[key],
                                                 src.timestamp, src.timestamp))
        row = await cur.fetchone()
        assert row is not None
        entity_ids[key] = row[0]

    links: set[tuple[uuid.UUID, uuid.UUID, str]] = set()
    subject_id = entity_ids.get(norm_name(k.subject))
    relations: list[tuple[uuid.UUID, str, uuid.UUID, float, uuid.UUID]] = []
    for (item, _), mid in zip(items, memory_ids, strict=True):
        obj_key = norm_name(item.object) if item.object else None
        for name, _kind in item_entities(item):
            eid = entity_ids.get(norm_name(name))
            if eid is not None:
                links.add((mid, eid, "object" if norm_name(name) == obj_key else "mention"))
        if subject_id is not None and item.type != "entity":
            links.add((mid, subject_id, "subject"))
            if item.predicate and obj_key and obj_key in entity_ids:
                relations.append((subject_id, item.predicate, entity_ids[obj_key], item.confidence, mid))
    cur = await conn.execute(
        "SELECT memory_id FROM ltm_memories WHERE user_id = %s AND type = 'episodic' AND content_hash = %s",
        (k.user_id, k.episodic_hash))
    episodic = await cur.fetchone()
    if episodic is not None:
        for name, _ in k.episodic_entities:
            eid = entity_ids.get(norm_name(name))
            if eid is not None:
                links.add((episodic[0], eid, "mention"))
    if links:
        async with conn.cursor() as c:
            await c.executemany(
                "INSERT INTO ltm_memory_entities (memory_id, entity_id, user_id, role) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                [(m, e, k.user_id, role) for m, e, role in sorted(links)])
    for subj, pred, obj, conf, mid in sorted(relations, key=lambda r: (str(r[0]), r[1], str(r[2]))):
        await conn.execute(RELATION_UPSERT, (uuid.uuid4(), k.user_id, subj, pred, obj, conf, src.timestamp, mid))

    for slot in sorted({item.slot for item, _ in items if item.slot}):
        await supersede(conn, k.user_id, k.subject, slot)
    return [str(m) for m in memory_ids]


# --------------------------------------------------------------------------- search
async def search_entities(pool: AsyncConnectionPool, user_id: str, query: str, qvec: np.ndarray, limit: int,
                          types: list[str] | None = None, min_similarity: float = 0.35) -> list[dict[str, Any]]:
    """The user's entities that the query names or resembles, best first, with relations and memories."""
    qnorm = norm_name(query)
    where = ["user_id = %(user_id)s"]
    params: dict[str, Any] = {"user_id": user_id, "q": qvec, "qnorm": qnorm, "min_sim": min_similarity}
    if types:
        where.append("type = ANY(%(types)s)")
        params["types"] = types
    sql = (
        "SELECT entity_id, name, name_norm, type, mentions, first_seen, last_seen,"
        " 1 - (embedding <=> %(q)s) AS similarity FROM ltm_entities"
        f" WHERE {' AND '.join(where)} AND (1 - (embedding <=> %(q)s) >= %(min_sim)s"
        " OR strpos(%(qnorm)s, name_norm) > 0 OR strpos(name_norm, %(qnorm)s) > 0)"
    )
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(sql, params)
        rows = await cur.fetchall()
        scored = []
        for r in rows:
            name = r["name_norm"]
            exact = name == qnorm
            named = bool(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", qnorm)) or bool(
                re.search(rf"(?<!\w){re.escape(qnorm)}(?!\w)", name))
            if not (named or r["similarity"] >= min_similarity):
                continue
            score = float(r["similarity"]) + (0.6 if exact else 0.3 if named else 0.0)
            scored.append((score, r))
        scored.sort(key=lambda sr: (-sr[0], -sr[1]["mentions"]))
        top = scored[:limit]
        ids = [r["entity_id"] for _, r in top]
        relations = await _relations(conn, user_id, ids)
        memories = await _memories(conn, user_id, ids)
    return [{
        "entity_id": str(r["entity_id"]), "name": r["name"], "type": r["type"], "mentions": r["mentions"],
        "score": round(score, 4), "similarity": round(float(r["similarity"]), 4),
        "first_seen": r["first_seen"], "last_seen": r["last_seen"],
        "relations": relations.get(r["entity_id"], []), "memory_ids": memories.get(r["entity_id"], []),
    } for score, r in top]


async def _relations(conn: AsyncConnection, user_id: str,
                     ids: list[uuid.UUID]) -> dict[uuid.UUID, list[dict[str, Any]]]:
    if not ids:
        return {}
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT r.subject_id, r.object_id, s.name AS subject, r.predicate, o.name AS object, r.strength,"
        " r.confidence, r.valid_from, r.valid_to, r.memory_id FROM ltm_relations r"
        " JOIN ltm_entities s ON s.entity_id = r.subject_id JOIN ltm_entities o ON o.entity_id = r.object_id"
        " WHERE r.user_id = %(u)s AND (r.subject_id = ANY(%(ids)s) OR r.object_id = ANY(%(ids)s))"
        " ORDER BY r.valid_to IS NOT NULL, r.strength DESC, r.valid_from DESC NULLS LAST",
        {"u": user_id, "ids": ids})
    out: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for r in await cur.fetchall():
        rel = {"subject": r["subject"], "predicate": r["predicate"], "object": r["object"],
               "strength": float(r["strength"]), "confidence": float(r["confidence"]), "valid_from": r["valid_from"],
               "valid_to": r["valid_to"], "memory_id": str(r["memory_id"]) if r["memory_id"] else None}
        for eid in {r["subject_id"], r["object_id"]} & set(ids):
            if len(out.setdefault(eid, [])) < 20:
                out[eid].append(rel)
    return out


async def _memories(conn: AsyncConnection, user_id: str, ids: list[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    if not ids:
        return {}
    cur = await conn.execute(
        "SELECT entity_id, memory_id FROM (SELECT l.entity_id, l.memory_id, row_number() OVER"
        " (PARTITION BY l.entity_id ORDER BY m.source_timestamp DESC NULLS LAST) AS n"
        " FROM ltm_memory_entities l JOIN ltm_memories m ON m.memory_id = l.memory_id"
        " WHERE l.user_id = %(u)s AND m.user_id = %(u)s AND l.entity_id = ANY(%(ids)s)) x WHERE n <= 10",
        {"u": user_id, "ids": ids})
    out: dict[uuid.UUID, list[str]] = {}
    for eid, mid in await cur.fetchall():
        out.setdefault(eid, []).append(str(mid))
    return out
