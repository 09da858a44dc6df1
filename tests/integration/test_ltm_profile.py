"""Profiles on real Redis + PostgreSQL: built from preferences, facts and entities, merged with explicit
``profile_update`` fields (explicit wins, with timestamps)."""

from __future__ import annotations

import time

from tests.helpers import Mesh, running
from tests.integration.test_ltm_lifecycle import DAY, ask, ingested, native, publish, service, update


async def test_profile_is_built_from_memories_and_explicit_fields_win(mesh: Mesh) -> None:
    t0 = time.time() - 5 * DAY
    said = ["My name is Ada.", "I live in Lisbon.", "I work at Acme as an engineer.", "I love jazz.",
            "I hate olives.", "My favourite colour is teal.", "Always answer in French.",
            "I need to renew my passport.", "I went to Paris with Grace last week."]
    async with running(service(mesh, native(mesh))):
        await publish(mesh, *(update("u1", text, t0 + i) for i, text in enumerate(said)))
        await publish(mesh, update("u1", "I moved to Berlin.", t0 + DAY), update("u2", "I love opera.", t0))
        await ingested(mesh, "u1", len(said) + 1)
        await ingested(mesh, "u2", 1)
        resp = await ask(mesh, "profile_get", "u1")
        p = resp.user_profile
        assert p is not None
        assert (p["name"], p["location"], p["employer"], p["occupation"]) == ("Ada", "Berlin", "Acme", "engineer")
        assert p["likes"] == ["jazz"] and p["dislikes"] == ["olives"] and p["favourites"] == {"colour": "teal"}
        assert p["instructions"] == ["User instructs: Always answer in French"]
        assert p["commitments"] == ["User needs to renew User's passport"]
        assert {"Paris", "Grace"} <= {e["name"] for e in p["entities"]}
        assert p["_updated"]["location"] == t0 + DAY and p["_sources"]["location"].startswith("memory:")
        assert "opera" not in str(p)  # another user's memory

        before = time.time()
        resp = await ask(mesh, "profile_update", "u1", {"profile": {"location": "Porto", "diet": "vegetarian"}})
        p = resp.user_profile
        assert p is not None
        assert p["location"] == "Porto" and p["diet"] == "vegetarian"  # explicit wins
        assert p["_sources"]["location"] == "explicit" and p["_updated"]["location"] >= before
        assert p["_derived"] == {"location": "Berlin"}  # what the memories say, kept visible
        assert p["name"] == "Ada" and p["_sources"]["name"].startswith("memory:")
        again = (await ask(mesh, "profile_get", "u1")).user_profile
        assert again == p
        assert (await ask(mesh, "profile_get", "u2")).user_profile["likes"] == ["opera"]  # type: ignore[index]


async def test_a_two_person_conversation_profiles_both_speakers(mesh: Mesh) -> None:
    t0 = time.time() - DAY
    turns = [("Caroline", "I live in Lisbon."), ("Caroline", "I love pottery."), ("Caroline", "I work at a school."),
             ("Melanie", "I love camping with my kids."), ("Melanie", "I'm from Ohio.")]
    async with running(service(mesh, native(mesh))):
        await publish(mesh, *(update("u1", text, t0 + i, speaker=who) for i, (who, text) in enumerate(turns)))
        await ingested(mesh, "u1", len(turns))
        p = (await ask(mesh, "profile_get", "u1")).user_profile
    assert p is not None
    assert p["name"] == "Caroline" and p["location"] == "Lisbon" and p["likes"] == ["pottery"]
    melanie = p["people"]["Melanie"]
    assert melanie["origin"] == "Ohio" and melanie["likes"] == ["camping with Melanie's kids"]
    assert p["_sources"]["people.Melanie.origin"].startswith("memory:")
