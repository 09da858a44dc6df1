"""The knowledge graph on real Redis + PostgreSQL: entities, relations and links built on ingest, and the
``search_entities`` request over the bus."""

from __future__ import annotations

import time
from typing import Any

from tests.helpers import Mesh, running
from tests.integration.test_ltm_lifecycle import DAY, ask, ingested, native, publish, rows, service, update


async def _conversation(mesh: Mesh) -> float:
    t0 = time.time() - 10 * DAY
    turns = [
        ("Caroline", "I love hiking with Melanie in the Alps.", t0),
        ("Caroline", "I live in Lisbon and I work at Acme.", t0 + 60),
        ("Melanie", "I adopted a puppy named Oscar yesterday.", t0 + 120),
        ("Caroline", "I moved to Berlin.", t0 + DAY),
        ("Caroline", "Berlin is cold but I like it.", t0 + DAY + 60),
    ]
    await publish(mesh, *(update("u1", text, ts, speaker=who) for who, text, ts in turns))
    await publish(mesh, update("u2", "I live in Berlin too.", t0))
    await ingested(mesh, "u1", len(turns))
    await ingested(mesh, "u2", 1)
    return t0


async def test_ingest_builds_entities_relations_and_links(mesh: Mesh) -> None:
    async with running(service(mesh, native(mesh))):
        t0 = await _conversation(mesh)
    ents = {r[0]: r[1:] for r in await rows(
        mesh, "SELECT name, type, mentions FROM ltm_entities WHERE user_id = %s", "u1")}
    assert ents["Caroline"][0] == "person" and ents["Melanie"][0] == "person"
    assert ents["Berlin"] == ("place", 2) and ents["Lisbon"][0] == "place" and ents["Acme"][0] == "organization"
    rels = {(s, p, o): (vf, vt) for s, p, o, vf, vt in await rows(
        mesh, "SELECT s.name, r.predicate, o.name, r.valid_from, r.valid_to FROM ltm_relations r"
              " JOIN ltm_entities s ON s.entity_id = r.subject_id JOIN ltm_entities o ON o.entity_id = r.object_id"
              " WHERE r.user_id = %s", "u1")}
    assert rels[("Caroline", "lives_in", "Lisbon")] == (t0 + 60, t0 + DAY)  # superseded by the move
    assert rels[("Caroline", "lives_in", "Berlin")] == (t0 + DAY, None)
    assert rels[("Caroline", "works_at", "Acme")] == (t0 + 60, None)
    assert ("Caroline", "likes", "hiking with Melanie in the Alps") in rels
    # each memory is linked to what it mentions, the turn itself too
    linked = await rows(mesh, "SELECT m.type, m.content FROM ltm_memory_entities l JOIN ltm_memories m"
                              " ON m.memory_id = l.memory_id JOIN ltm_entities e ON e.entity_id = l.entity_id"
                              " WHERE l.user_id = %s AND e.name = 'Oscar' ORDER BY m.type", "u1")
    assert ("episodic", "I adopted a puppy named Oscar yesterday.") in linked
    assert any(t == "fact" and c.startswith("Melanie adopted a puppy named Oscar") for t, c in linked)
    # u2's Berlin is u2's own entity
    assert await mesh.count("SELECT count(*) FROM ltm_entities WHERE name_norm = 'berlin'") == 2


async def test_search_entities_over_the_bus(mesh: Mesh) -> None:
    async with running(service(mesh, native(mesh))):
        await _conversation(mesh)
        resp = await ask(mesh, "search_entities", "u1", {"query": "Berlin"})
        assert resp.success and resp.data is not None
        found: list[dict[str, Any]] = resp.data["entities"]
        top = found[0]
        assert top["name"] == "Berlin" and top["type"] == "place" and top["mentions"] == 2
        want = {"subject": "Caroline", "predicate": "lives_in", "object": "Berlin"}
        assert want.items() <= top["relations"][0].items()
        contents = {r[0] for r in await rows(mesh, "SELECT content FROM ltm_memories WHERE user_id = %s"
                                                   " AND memory_id::text = ANY(%s)", "u1", top["memory_ids"])}
        assert "Caroline moved to Berlin" in contents and "Berlin is cold but I like it." in contents
        # a question naming an entity finds it; the type filter applies
        resp = await ask(mesh, "search_entities", "u1", {"query": "what does Melanie have?", "limit": 3})
        assert resp.data is not None and resp.data["entities"][0]["name"] == "Melanie"
        resp = await ask(mesh, "search_entities", "u1", {"query": "Melanie", "types": ["place"]})
        assert resp.data is not None and all(e["type"] == "place" for e in resp.data["entities"])
        assert "Melanie" not in {e["name"] for e in resp.data["entities"]}
        # another user's entities never show
        resp = await ask(mesh, "search_entities", "u2", {"query": "Lisbon Acme Melanie Oscar"})
        assert resp.data is not None and not {"Lisbon", "Acme", "Melanie", "Oscar"} & {
            e["name"] for e in resp.data["entities"]}
        resp = await ask(mesh, "search_entities", "nobody", {"query": "Berlin"})
        assert resp.success and resp.data == {"entities": []}


async def test_delete_user_removes_the_graph_and_lifecycle_rows(mesh: Mesh) -> None:
    tables = ["ltm_memories", "ltm_entities", "ltm_relations", "ltm_memory_entities", "ltm_user_state",
              "ltm_ingested"]
    async with running(service(mesh, native(mesh))):
        await _conversation(mesh)
        assert all([await mesh.count(f"SELECT count(*) FROM {t} WHERE user_id = 'u1'") for t in tables])
        resp = await ask(mesh, "delete_user", "u1")
        assert resp.success
    for t in tables:
        assert await mesh.count(f"SELECT count(*) FROM {t} WHERE user_id = 'u1'") == 0, t
    assert await mesh.count("SELECT count(*) FROM ltm_entities WHERE user_id = 'u2'") >= 1
