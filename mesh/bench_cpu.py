"""Where a workload's CPU went: the CPU time (user + system, from ``/proc``) of each service's processes with their
children (ltm's ingest child), of PostgreSQL (the postmaster and its backends), of Redis and of the bench's own
process, over the workload. A target out of reach on 2 cores shows here which process holds the cores.

The servers are found through their own connections (``pg_backend_pid()``'s parent, Redis's ``INFO server``
``process_id``), so this works for the servers the bench starts and for any on this machine; for a server
elsewhere (another host, a container: its pid names no process of that name here) its row is missing. Linux only;
elsewhere every figure is empty.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from mesh.bench_procs import ServiceProcess

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _processes() -> dict[int, tuple[int, float, float, str]]:
    """pid -> (parent pid, its own CPU seconds so far, those of its children it has reaped, command name) of every
    process visible in /proc."""
    out: dict[int, tuple[int, float, float, str]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                head, _, tail = f.read().rpartition(b")")
            fields = tail.split()
        except OSError:  # gone meanwhile
            continue
        if len(fields) < 15:
            continue
        comm = head.partition(b"(")[2].decode(errors="replace")
        # after the command: state, ppid, ... utime, stime, cutime, cstime (the 14th-17th fields of the line)
        out[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK,
                          (int(fields[13]) + int(fields[14])) / _TICK, comm)
    return out


def _tree(table: dict[int, tuple[int, float, float, str]], roots: Iterable[int]) -> float:
    """CPU seconds of ``roots`` and all their descendants, with the children each has reaped (a backend or a
    worker that ended during the measurement is counted through its parent, not lost)."""
    children: dict[int, list[int]] = {}
    for pid, row in table.items():
        children.setdefault(row[0], []).append(pid)
    total, todo, seen = 0.0, [r for r in roots if r in table], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += table[pid][1] + table[pid][2]
        todo.extend(children.get(pid, []))
    return total


def _named(table: dict[int, tuple[int, float, float, str]], pid: int, command: str) -> bool:
    """Whether ``pid`` is a process of ``command`` here: a server in a container reports a pid of its own
    namespace, which names another process (or none) on this machine."""
    return pid in table and table[pid][3].startswith(command)


@dataclass
class CpuMeter:
    """Label -> root pids (a tree each, or the process alone for ``bench``): ``start()`` then ``stop()``. A
    service's row counts its children; ``of_which_children`` says how much of it they took."""

    trees: dict[str, list[int]] = field(default_factory=dict)
    alone: dict[str, int] = field(default_factory=dict)
    _before: dict[str, float] = field(default_factory=dict)

    @classmethod
    async def of(cls, services: list[ServiceProcess], redis: Any, database_url: str) -> CpuMeter:
        meter = cls(alone={"bench": os.getpid()})
        for p in services:
            meter.trees.setdefault(p.service, []).append(p.pid)
        try:
            info = await redis.info("server")
            if _named(_processes(), int(info["process_id"]), "redis-server"):
                meter.alone["redis"] = int(info["process_id"])
        except Exception:  # noqa: BLE001 - a cluster client or a server that does not say: no Redis row
            pass
        try:
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
                row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
                table = _processes()  # read while the backend lives: it exits with this connection
            if row and _named(table, int(row[0]), "postgres") and _named(table, table[int(row[0])][0], "postgres"):
                meter.trees["postgres"] = [table[int(row[0])][0]]  # its parent, the postmaster
        except psycopg.Error:  # no PostgreSQL row
            pass
        return meter

    def _now(self) -> dict[str, float]:
        table = _processes()
        now = {label: _tree(table, roots) for label, roots in self.trees.items()}
        for label, roots in self.trees.items():  # a service's children apart too (ltm's ingest child)
            if label != "postgres":
                now[f"{label}.children"] = now[label] - sum(table[r][1] for r in roots if r in table)
        # a process alone (the bench, Redis): its own time only (the bench reaps the services it stopped)
        now.update({label: table[pid][1] for label, pid in self.alone.items() if pid in table})
        return now

    def start(self) -> None:
        self._before = self._now()

    def stop(self, seconds: float, units: int = 0, unit: str = "turn") -> dict[str, Any]:
        """Cores each label used over the ``seconds`` since :meth:`start` and, with ``units``, CPU ms per unit."""
        used = {k: v - self._before[k] for k, v in self._now().items() if k in self._before}
        trees = {k: v for k, v in used.items() if not k.endswith(".children")}  # each CPU second counted once
        children = {k: v for k, v in used.items() if k.endswith(".children") and v > 0}
        out: dict[str, Any] = {"cores": {k: round(v / seconds, 3) for k, v in sorted(trees.items())} if seconds else {},
                               "cores_total": round(sum(trees.values()) / seconds, 3) if seconds else None,
                               "of_which_children": ({k: round(v / seconds, 3) for k, v in sorted(children.items())}
                                                     if seconds else {})}
        if units:
            out[f"cpu_ms_per_{unit}"] = {k: round(v * 1000 / units, 2) for k, v in sorted(trees.items())}
        return out
