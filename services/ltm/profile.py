"""User profiles: built from the user's current memories, merged with the explicit ``profile_update`` fields.

Derived (from memories that are current, i.e. not superseded):

- single-valued slots become fields: ``name``, ``preferred_name``, ``location``, ``employer``, ``occupation``,
  ``origin``, ``birthplace``, ``age``, and any other slot under ``attributes`` ("my sister" → "nurse"; how it is
  now, an adjective, under its own slot: "sister (state)" → "sick");
- ``favourites`` ("favourite colour" → "teal"), ``likes`` and ``dislikes`` from preferences;
- ``facts``, ``instructions`` and ``commitments`` (their sentences, most mentioned first);
- ``entities``: the people, places and things the user mentions most.

The profile is about the main subject (the speaker with the most memories; "User" when speakers are anonymous);
other speakers of the same user (a two-person conversation) are under ``people``. Explicit fields win over derived
ones; ``_updated`` holds each field's timestamp (epoch seconds: when it was set explicitly, or when the memory it
comes from was last stated), ``_sources`` where it comes from (``explicit`` or ``memory:<id>``), and ``_derived``
what a derived value was where an explicit field overrides it.
"""

from __future__ import annotations

from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

FIELDS = ("name", "preferred_name", "location", "employer", "occupation", "origin", "birthplace", "age")
LIST_LIMIT = 20


def _section(rows: list[dict[str, Any]], updated: dict[str, float], sources: dict[str, str],
             prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    attributes: dict[str, str] = {}
    favourites: dict[str, str] = {}
    lists: dict[str, list[str]] = {"likes": [], "dislikes": [], "facts": [], "instructions": [], "commitments": []}
    for r in rows:  # oldest first: a later statement of a slot overwrites an earlier one
        slot, value = r["slot"], r["slot_value"]
        if slot and value:
            if slot in FIELDS:
                key, target = slot, out
            elif slot.startswith(("favourite ", "favorite ")):
                key, target = slot.split(" ", 1)[1], favourites
            else:
                key, target = slot.removeprefix("my "), attributes
            target[key] = value
            field = key if target is out else f"{'favourites' if target is favourites else 'attributes'}.{key}"
            updated[prefix + field] = r["asserted_at"]
            sources[prefix + field] = f"memory:{r['memory_id']}"
            continue
        kind = r["type"]
        if kind == "preference":
            bucket = "dislikes" if r["predicate"] == "dislikes" else "likes"
            lists[bucket].append(r["object"] or r["content"])
        elif kind == "fact":
            lists["facts"].append(r["content"])
        elif kind == "instruction":
            lists["instructions"].append(r["content"])
        elif kind == "commitment":
            lists["commitments"].append(r["content"])
    if favourites:
        out["favourites"] = favourites
    if attributes:
        out["attributes"] = attributes
    for key, values in lists.items():
        if values:
            out[key] = list(dict.fromkeys(reversed(values)))[:LIST_LIMIT]  # newest first, distinct
    return out


async def build_profile(pool: AsyncConnectionPool, user_id: str, stored: dict[str, Any]) -> dict[str, Any]:
    """The merged profile; ``stored`` is the explicit profile row (``LtmStore.get_profile``)."""
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            "SELECT memory_id, type, subject, slot, slot_value, content, meta ->> 'predicate' AS predicate,"
            " meta ->> 'object' AS object, asserted_at, mentions"
            " FROM ltm_memories WHERE user_id = %s AND subject IS NOT NULL AND valid_to IS NULL"
            " AND type = ANY(%s) ORDER BY mentions DESC, confidence DESC, asserted_at DESC NULLS LAST LIMIT 500",
            (user_id, ["preference", "fact", "instruction", "commitment"]))
        rows = await cur.fetchall()
        await cur.execute(
            "SELECT name, type, mentions FROM ltm_entities WHERE user_id = %s AND type <> 'thing'"
            " ORDER BY mentions DESC, last_seen DESC NULLS LAST LIMIT 40", (user_id,))
        entities = await cur.fetchall()
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r["asserted_at"] or 0.0):
        by_subject.setdefault(r["subject"], []).append(r)
    subjects = sorted(by_subject, key=lambda s: -len(by_subject[s]))
    main = subjects[0] if subjects else None

    updated: dict[str, float] = {}
    sources: dict[str, str] = {}
    profile: dict[str, Any] = {"user_id": user_id}
    if main is not None:
        profile.update(_section(by_subject[main], updated, sources))
        if main not in ("User", "Assistant") and "name" not in profile:
            profile["name"] = main
            sources["name"] = "speaker"
        others = {s: _section(by_subject[s], updated, sources, prefix=f"people.{s}.") for s in subjects[1:]}
        if others:
            profile["people"] = others
    names = {n.lower() for n in [*(subjects or []), str(profile.get("name", ""))]}
    listed = [{"name": e["name"], "type": e["type"], "mentions": e["mentions"]} for e in entities
              if e["name"].lower() not in names]
    if listed:
        profile["entities"] = listed[:LIST_LIMIT]

    explicit = {k: v for k, v in stored.items() if k not in ("user_id", "_updated")}
    derived = {k: profile[k] for k in explicit if k in profile and profile[k] != explicit[k]}
    for key, value in explicit.items():
        profile[key] = value
        sources[key] = "explicit"
        if key in stored.get("_updated", {}):
            updated[key] = stored["_updated"][key]
    profile["_updated"] = updated
    profile["_sources"] = sources
    if derived:
        profile["_derived"] = derived
    return profile
