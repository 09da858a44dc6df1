"""``mesh memories USER`` and ltm's ``list`` request (issue "Operate it", part 5): a user's memories, newest first,
paged and filtered by type, searched, counted and deleted over the bus; never another user's."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from tests.conftest import ROOT
from tests.helpers import Mesh, ask_ltm, ltm_request, running


async def _mesh_cli(mesh: Mesh, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "REDIS_URL": mesh.redis_url, "MESH_KEY_PREFIX": mesh.names.prefix}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mesh", "memories", *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_list_pages_a_users_memories_and_the_cli_lists_searches_and_deletes(mesh: Mesh) -> None:
    facts = [("I am allergic to peanuts.", "fact"), ("I prefer aisle seats.", "preference"),
             ("My brother Tomas lives in Vilnius.", "fact"), ("Always answer in Spanish.", "instruction")]
    async with running(mesh.ltm()):
        for content, type_ in facts:
            added = await ask_ltm(mesh, ltm_request("add", "u-list", {"content": content, "type": type_}))
            assert added.success, added.error
        other = await ask_ltm(mesh, ltm_request("add", "u-other", {"content": "I am allergic to cats."}))
        assert other.success

        page = await ask_ltm(mesh, ltm_request("list", "u-list", {"limit": 3}))
        assert page.success and [m.content for m in page.memories] == [c for c, _ in reversed(facts)][:3]
        rest = await ask_ltm(mesh, ltm_request("list", "u-list", {"limit": 3, "offset": 3}))
        assert [m.content for m in rest.memories] == [facts[0][0]]
        prefs = await ask_ltm(mesh, ltm_request("list", "u-list", {"types": ["preference"]}))
        assert [m.content for m in prefs.memories] == ["I prefer aisle seats."]
        for hostile in ("u-%", "*", "", "u-list' OR '1'='1"):
            got = await ask_ltm(mesh, ltm_request("list", hostile, {"limit": 200}))
            assert not (got.memories or []), (hostile, got)
        bad = await ask_ltm(mesh, ltm_request("list", "u-list", {"limit": 0}))
        assert not bad.success and bad.error and bad.error.code == "bad_request"

        code, out, err = await _mesh_cli(mesh, "u-list", "--json")
        assert code == 0, err
        listed = json.loads(out)
        assert len(listed) == 4 and all("cats" not in m["content"] for m in listed)
        code, out, err = await _mesh_cli(mesh, "u-list", "search", "Where does my brother live?", "--limit", "2")
        assert code == 0 and "Vilnius" in out.splitlines()[0], (out, err)
        code, out, err = await _mesh_cli(mesh, "u-list", "stats", "--json")
        assert code == 0 and json.loads(out)["memories"] == 4, (out, err)
        code, out, err = await _mesh_cli(mesh, "u-list", "delete", listed[0]["memory_id"])
        assert code == 0, err
        code, out, err = await _mesh_cli(mesh, "u-other", "delete", listed[1]["memory_id"])  # not u-other's
        assert code == 1 and "not_found" in err, (out, err)
        code, out, err = await _mesh_cli(mesh, "u-list", "delete", "--all")
        assert code == 0, err
        left = await ask_ltm(mesh, ltm_request("list", "u-list", {}))
        kept = await ask_ltm(mesh, ltm_request("list", "u-other", {}))
        assert left.memories == [] and [m.content for m in kept.memories] == ["I am allergic to cats."]
