"""The bus on a Redis Cluster (issue "Fast at any size", part 3): the mesh's own scenarios, run unchanged on a local
three-node cluster started by the fixture (``redis-server --cluster-enabled yes``, slots split evenly), with
redis-py's cluster client, as ``REDIS_CLUSTER=true`` gives the services.

What it shows: every command is routed by its key's slot and no MULTI spans two slots (a CROSSSLOT error would
fail the scenarios); replies over pub/sub reach requesters whatever node they are subscribed on; two copies of every
service still lose nothing and do nothing twice; a fact told once is quoted in later sessions; deleting a user
leaves nothing on any node; a session's STM keys share one slot, and the keyspace is spread over the nodes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from mesh.redis_cluster import LocalRedisCluster
from shared.contracts import Names
from shared.runtime.runner import is_cluster, redis_client
from tests.conftest import unbounded_keys
from tests.helpers import Mesh, mesh_for
from tests.integration.test_copies import (
    test_two_copies_of_every_service_lose_nothing_and_do_nothing_twice as two_copies_scenario,
)
from tests.integration.test_delete_user import (
    test_delete_user_leaves_nothing_of_the_user_in_any_table_or_key as deletion_scenario,
)
from tests.integration.test_memory_in_reply import (
    test_a_fact_told_once_is_quoted_in_every_later_session as recall_scenario,
)
from tests.integration.test_mesh_flow import (
    test_another_users_session_id_never_shows_that_session as isolation_scenario,
)


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"), nodes=3)
    cluster.start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
async def cluster_mesh(cluster_url: str, database_url: str, sync_embedder: Any) -> AsyncIterator[Mesh]:
    client = redis_client(cluster_url, cluster=True)
    assert is_cluster(client)
    names = Names().with_prefix(f"t{uuid.uuid4().hex[:10]}:")
    try:
        async with mesh_for(names, client, cluster_url, database_url, sync_embedder) as m:
            m.overrides = {s: {"redis_cluster": True} for s in ("memory", "ltm", "chat")}
            yield m
        unbounded = await unbounded_keys(client, names)
        assert not unbounded, f"keys left without a TTL or a bound: {unbounded}"
    finally:
        await client.aclose()


async def _keys_by_node(mesh: Mesh) -> dict[str, list[str]]:
    """The test's keys (its prefix) grouped by the node that holds them."""
    client: Any = mesh.redis
    out: dict[str, list[str]] = {}
    for node in client.get_primaries():
        keys = await client.execute_command("KEYS", f"{mesh.names.prefix}*", target_nodes=node)
        out[node.name] = sorted(k.decode() for k in keys)
    return out


async def test_two_copies_of_every_service_on_a_cluster(cluster_mesh: Mesh) -> None:
    await two_copies_scenario(cluster_mesh)
    by_node = await _keys_by_node(cluster_mesh)
    assert sum(1 for keys in by_node.values() if keys) >= 2, f"the keyspace is not spread: {by_node}"
    # a session's STM keys are in one slot (one MULTI writes them), so on one node
    client: Any = cluster_mesh.redis
    sid = "s-copy-0-0"
    slots = {client.keyslot(k) for k in (cluster_mesh.names.stm_turns(sid), cluster_mesh.names.stm_meta(sid),
                                         cluster_mesh.names.stm_summary(sid))}
    assert len(slots) == 1
    turns = cluster_mesh.names.stm_turns(sid)
    assert any(turns in keys for keys in by_node.values()), "the session's STM is missing"
    # chat_ai's dedup keys of a reply are in the ai_responses stream's slot (the reply's MULTI)
    assert client.keyslot(cluster_mesh.names.reply_dedup("u", "m", "done")) == \
        client.keyslot(cluster_mesh.names.ai_responses)


async def test_a_fact_is_recalled_in_later_sessions_on_a_cluster(cluster_mesh: Mesh) -> None:
    await recall_scenario(cluster_mesh)


async def test_another_users_session_stays_hidden_on_a_cluster(cluster_mesh: Mesh) -> None:
    await isolation_scenario(cluster_mesh)


async def test_delete_user_reaches_every_node(cluster_mesh: Mesh) -> None:
    await deletion_scenario(cluster_mesh)


def test_a_single_redis_client_is_not_a_cluster(redis: aioredis.Redis) -> None:
    assert not is_cluster(redis)
