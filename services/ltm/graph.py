"""The knowledge graph (the medium-term tier) and the write path of extracted memories.

On ingest, in the same transaction as the turns' episodic memories and idempotency records, :func:`write_knowledge`
stores the typed memories extracted from a batch of turns (a repeat of the same statement adds a mention and its
provenance instead of a row), upserts their entities (the speaker is one), the relations between them
(speaker --likes/lives_in/works_at...--> object), and the links memory ↔ entity; then it re-resolves the
supersession of every single-valued slot the turn touched (:func:`services.ltm.lifecycle.supersede`).

:func:`search_entities` serves the ``search_entities`` request: entities of one user ranked by name match and
embedding similarity, each with its relations and the memories that mention it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from services.ltm.extraction import Extracted
from services.ltm.lifecycle import KEEP_SOURCES, supersede
from services.ltm.store import MemoryKey, content_hash, values

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
    salience: float | None = None  # the turn's (services/ltm/salience): its knowledge gets it too


TYPED_INSERT = (
    "INSERT INTO ltm_memories (memory_id, user_id, type, content, content_hash, embedding, confidence, entities,"
    " source_message_id, source_session_id, source_timestamp, speaker, meta, subject, slot, slot_value,"
    " valid_from, asserted_at, sources, mentions, salience, content_tokens)"
    " VALUES {values}"
    " ON CONFLICT (user_id, type, content_hash) DO UPDATE SET"
    " salience = GREATEST(ltm_memories.salience, EXCLUDED.salience),"
    " confidence = GREATEST(ltm_memories.confidence, EXCLUDED.confidence),"
    " mentions = ltm_memories.mentions + EXCLUDED.mentions,"
    " sources = jsonb_path_query_array(ltm_memories.sources || EXCLUDED.sources,"
    f" '$[last - {KEEP_SOURCES - 1} to last]'),"
    " valid_from = LEAST(ltm_memories.valid_from, EXCLUDED.valid_from),"
    " asserted_at = GREATEST(ltm_memories.asserted_at, EXCLUDED.asserted_at),"
    " subject = COALESCE(ltm_memories.subject, EXCLUDED.subject),"
    " slot = COALESCE(ltm_memories.slot, EXCLUDED.slot),"
    " slot_value = COALESCE(ltm_memories.slot_value, EXCLUDED.slot_value)"
    " RETURNING user_id, type, content_hash, memory_id"
)

ENTITY_UPSERT = (
    "INSERT INTO ltm_entities (entity_id, user_id, name, name_norm, type, embedding, first_seen, last_seen, mentions)"
    " VALUES {values}"
    " ON CONFLICT (user_id, name_norm) DO UPDATE SET mentions = ltm_entities.mentions + EXCLUDED.mentions,"
    " first_seen = LEAST(ltm_entities.first_seen, EXCLUDED.first_seen),"
    " last_seen = GREATEST(ltm_entities.last_seen, EXCLUDED.last_seen),"
    " type = CASE WHEN ltm_entities.type = 'thing' THEN EXCLUDED.type ELSE ltm_entities.type END"
    " RETURNING user_id, name_norm, entity_id"
)

RELATION_UPSERT = (
    "INSERT INTO ltm_relations (relation_id, user_id, subject_id, predicate, object_id, strength, confidence,"
    " valid_from, memory_id) VALUES {values}"
    " ON CONFLICT (user_id, subject_id, predicate, object_id) DO UPDATE SET"
    " strength = ltm_relations.strength + EXCLUDED.strength,"
    " confidence = GREATEST(ltm_relations.confidence, EXCLUDED.confidence),"
    " valid_from = LEAST(ltm_relations.valid_from, EXCLUDED.valid_from),"
    " valid_to = NULL, memory_id = EXCLUDED.memory_id"
)

LINK_INSERT = ("INSERT INTO ltm_memory_entities (memory_id, entity_id, user_id, role) VALUES {values}"
               " ON CONFLICT DO NOTHING")


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


async def write_knowledge(conn: AsyncConnection, turns: Sequence[TurnKnowledge],
                          episodic_ids: Mapping[MemoryKey, uuid.UUID] | None = None,
                          tokens: Mapping[str, int] | None = None) -> list[list[str]]:
    """Store the typed memories, entities, relations and links of many turns (inside the ingest transaction), in
    one statement per table; returns each turn's typed memory ids.

    Many mentions of one row within the batch are merged first, as one upsert after another would leave it
    (mentions and strengths add up, sources append, the first values stay), and every statement writes its rows
    in key order (by table, then key), so that concurrent ingests never wait on each other in a cycle.
    ``episodic_ids``: the memory id of each turn's episodic memory, by (user, "episodic", content hash);
    ``tokens``: the WordPiece tokens of contents (``content_tokens``; a content not in it: NULL).
    """
    memories = _merge_memories(turns, tokens or {})
    ids = await _upsert(conn, TYPED_INSERT, 22, [row for _, row in sorted(memories.items())])
    turn_mids = [[ids[(k.user_id, it.type, content_hash(it.content))] for it, _ in k.items] for k in turns]

    entities: dict[tuple[str, str], list[Any]] = {}
    for k in turns:
        names = entity_names([i for i, _ in k.items], k.subject)
        keys = {norm_name(n) for n, _ in names}
        for name, kind in k.episodic_entities:
            if norm_name(name) not in keys:
                keys.add(norm_name(name))
                names.append((name, kind))
        for name, kind in sorted(names, key=lambda nk: norm_name(nk[0])):
            key = norm_name(name)
            if not key or key not in k.entity_vectors:
                continue
            ts = k.source.timestamp
            row = entities.get((k.user_id, key))
            if row is None:
                entities[(k.user_id, key)] = [uuid.uuid4(), k.user_id, name, key, kind, k.entity_vectors[key], ts, ts,
                                              1]
            else:
                row[4] = kind if row[4] == "thing" else row[4]
                row[6], row[7], row[8] = min(row[6], ts), max(row[7], ts), row[8] + 1
    entity_ids: dict[str, dict[str, uuid.UUID]] = {}
    upserted = await _upsert(conn, ENTITY_UPSERT, 9, [row for _, row in sorted(entities.items())])
    for (user, key), entity_id in upserted.items():
        entity_ids.setdefault(user, {})[key] = entity_id

    links: dict[tuple[uuid.UUID, uuid.UUID], tuple[str, str]] = {}
    relations: dict[tuple[str, uuid.UUID, str, uuid.UUID], list[Any]] = {}
    for k, mids in zip(turns, turn_mids, strict=True):
        eid_of = entity_ids.get(k.user_id, {})
        turn_links: set[tuple[uuid.UUID, uuid.UUID, str]] = set()
        subject_id = eid_of.get(norm_name(k.subject))
        for (item, _), mid in zip(k.items, mids, strict=True):
            obj_key = norm_name(item.object) if item.object else None
            for name, _kind in item_entities(item):
                eid = eid_of.get(norm_name(name))
                if eid is not None:
                    turn_links.add((mid, eid, "object" if norm_name(name) == obj_key else "mention"))
            if subject_id is not None and item.type != "entity":
                turn_links.add((mid, subject_id, "subject"))
                if item.predicate and obj_key and obj_key in eid_of:
                    rel = relations.get((k.user_id, subject_id, item.predicate, eid_of[obj_key]))
                    if rel is None:
                        relations[(k.user_id, subject_id, item.predicate, eid_of[obj_key])] = [
                            uuid.uuid4(), k.user_id, subject_id, item.predicate, eid_of[obj_key], 1.0,
                            item.confidence, k.source.timestamp, mid]
                    else:
                        rel[5] += 1.0
                        rel[6], rel[7], rel[8] = max(rel[6], item.confidence), min(rel[7], k.source.timestamp), mid
        episodic = (episodic_ids or {}).get((k.user_id, "episodic", k.episodic_hash))
        if episodic is not None:
            for name, _ in k.episodic_entities:
                eid = eid_of.get(norm_name(name))
                if eid is not None:
                    turn_links.add((episodic, eid, "mention"))
        for mid, eid, role in sorted(turn_links):
            links.setdefault((mid, eid), (k.user_id, role))  # the first role stays (ON CONFLICT DO NOTHING)
    if links:
        link_rows = [(m, e, user, role) for (m, e), (user, role) in sorted(links.items())]
        await conn.execute(LINK_INSERT.format(values=values(len(link_rows), 4)), [p for r in link_rows for p in r])
    if relations:
        rel_rows = [r for _, r in sorted(relations.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2],
                                                                             str(kv[0][3])))]
        await conn.execute(RELATION_UPSERT.format(values=values(len(rel_rows), 9)), [p for r in rel_rows for p in r])

    for user_id, subject, slot in sorted({(k.user_id, k.subject, item.slot) for k in turns
                                          for item, _ in k.items if item.slot}):
        await supersede(conn, user_id, subject, slot)
    return [[str(m) for m in mids] for mids in turn_mids]


def _merge_memories(turns: Sequence[TurnKnowledge], tokens: Mapping[str, int]) -> dict[MemoryKey, list[Any]]:
    """One TYPED_INSERT row per (user, type, content hash) of the batch, its mentions merged in order."""
    rows: dict[MemoryKey, list[Any]] = {}
    for k in turns:
        src = k.source
        for item, vec in k.items:
            key = (k.user_id, item.type, content_hash(item.content))
            row = rows.get(key)
            if row is not None:  # as ON CONFLICT DO UPDATE would leave it
                row[6] = max(row[6], item.confidence)
                for col, value in ((13, k.subject), (14, item.slot), (15, slot_value(item))):  # COALESCE
                    row[col] = row[col] if row[col] is not None else value
                row[16], row[17] = min(row[16], src.timestamp), max(row[17], src.timestamp)
                row[18] = [*row[18], src.as_json()][-KEEP_SOURCES:]
                row[19] += 1
                if k.salience is not None:  # a repeat: the most salient of its mentions
                    row[20] = k.salience if row[20] is None else max(row[20], k.salience)
                continue
            meta = {**k.meta, "extraction": item.method}
            if item.predicate:
                meta["predicate"] = item.predicate
            if item.object:
                meta["object"] = item.object
            if item.event_date:
                meta["event_date"] = item.event_date
            rows[key] = [
                uuid.uuid4(), k.user_id, item.type, item.content, key[2], vec, item.confidence,
                [n for n, _ in item_entities(item)], src.message_id, src.session_id, src.timestamp, src.speaker,
                Jsonb(meta), k.subject, item.slot, slot_value(item), src.timestamp, src.timestamp,
                [src.as_json()], 1, k.salience, tokens.get(item.content),
            ]
    for row in rows.values():
        row[18] = Jsonb(row[18])
    return rows


async def _upsert(conn: AsyncConnection, sql: str, width: int, rows: list[list[Any]]) -> dict[Any, uuid.UUID]:
    """One multi-row upsert; ``{key columns: id}`` from its RETURNING (all but the last column are the key)."""
    if not rows:
        return {}
    cur = await conn.execute(sql.format(values=values(len(rows), width)), [p for r in rows for p in r])
    return {tuple(r[:-1]): r[-1] for r in await cur.fetchall()}


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
        " JOIN ltm_entities s ON s.user_id = %(u)s AND s.entity_id = r.subject_id"
        " JOIN ltm_entities o ON o.user_id = %(u)s AND o.entity_id = r.object_id"
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
        " FROM ltm_memory_entities l JOIN ltm_memories m ON m.user_id = l.user_id AND m.memory_id = l.memory_id"
        " WHERE l.user_id = %(u)s AND m.user_id = %(u)s AND l.entity_id = ANY(%(ids)s)) x WHERE n <= 10",
        {"u": user_id, "ids": ids})
    out: dict[uuid.UUID, list[str]] = {}
    for eid, mid in await cur.fetchall():
        out.setdefault(eid, []).append(str(mid))
    return out
