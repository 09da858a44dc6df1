"""A local Redis Cluster: N ``redis-server`` nodes with ``--cluster-enabled yes`` on free ports, the 16,384 hash
slots split evenly between them (primaries only), joined with CLUSTER MEET.

What the tests (tests/integration/test_cluster.py) and ``mesh cluster`` run the mesh on to show it works past one
Redis: every key is routed by its slot, the mesh's atomic writes keep their keys in one slot (hash tags,
shared/contracts/names.py), and pub/sub reaches subscribers on every node. The slots are assigned with CLUSTER
ADDSLOTSRANGE rather than ``redis-cli --cluster create`` so that only ``redis-server`` is needed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import redis

from mesh.infra import LOCALHOST, free_port
from mesh.redis_server import RedisServer

log = logging.getLogger("mesh.cluster")

SLOTS = 16_384


class LocalRedisCluster:
    def __init__(self, data_dir: Path, nodes: int = 3, *, node_timeout_ms: int = 5000) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.data_dir = Path(data_dir).absolute()
        # each node's cluster bus gets a free port of its own (the default, port + 10000, may be taken or > 65535)
        self.bus_ports = [free_port() for _ in range(nodes)]
        self.nodes = [
            RedisServer(self.data_dir / f"node-{i}", free_port(), persist=False, extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(bus), "--cluster-node-timeout", str(node_timeout_ms)])
            for i, bus in enumerate(self.bus_ports)
        ]

    @property
    def url(self) -> str:
        """The URL of one node: the cluster client finds the others from it (REDIS_URL with REDIS_CLUSTER=true)."""
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> str:
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(host=LOCALHOST, port=n.port, socket_timeout=5) for n in self.nodes]
        try:
            per = SLOTS // len(self.nodes)
            for i, client in enumerate(clients):
                first, last = i * per, (SLOTS - 1 if i == len(clients) - 1 else (i + 1) * per - 1)
                if not _owns(client, first):
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for node, bus in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                clients[0].execute_command("CLUSTER", "MEET", LOCALHOST, node.port, bus)
            self._wait_ok(clients, timeout)
        finally:
            for client in clients:
                client.close()
        log.info("redis cluster of %d nodes ready at %s", len(self.nodes), self.url)
        return self.url

    def _wait_ok(self, clients: list[redis.Redis], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            states = []
            for client in clients:
                info = client.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
                states.append((fields.get("cluster_state"), fields.get("cluster_known_nodes"),
                               fields.get("cluster_slots_assigned")))
            last = repr(states)
            if all(s == ("ok", str(len(clients)), str(SLOTS)) for s in states):
                return
            time.sleep(0.1)
        raise TimeoutError(f"redis cluster not ok within {timeout:.0f}s; last seen (state, nodes, slots): {last}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _owns(client: redis.Redis, slot: int) -> bool:
    """True when this node has the slot already (a restart on the same data directory keeps nodes.conf)."""
    return any(first <= slot <= last for first, last, *_ in client.execute_command("CLUSTER", "SLOTS"))


__all__ = ["LocalRedisCluster"]
