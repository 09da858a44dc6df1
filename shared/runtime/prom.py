"""Prometheus metrics of a service process, served on ``METRICS_PORT`` at ``/metrics``.

Three kinds, on one registry per process:

* the named metrics operators of memory systems expect (below: requests and their durations per request type,
  retrieval latency, memory operations, LLM calls and tokens, cache hits and misses), recorded where the
  event happens, each labelled with the ``service``;
* ``mesh_events_total{service, event}``: every counter the services already keep in process (the same ones
  mirrored to the ``metrics:<service>`` hash: ``processed``, ``dead_lettered``, ``rejected.<reason>``,
  ``expired``, ``replies.ltm_timeout``, ``drain_cancelled``, ...);
* the bus's health read from Redis at scrape time (:class:`BusCollector`): each stream's length and, per consumer
  group, its lag and pending entries; each dead-letter stream's length; each request list's length.

A service with worker children (ltm's ingest, shared/runtime/children.py) serves theirs on its own page: each child
serves ``/metrics`` on a local port of its own, without the bus, and :class:`WithChildren` adds its series to the
parent's families at scrape time, labelled ``process`` (``ingest0``...), so one scrape sees the whole service.

The HTTP server is prometheus_client's (a daemon thread); nothing here touches the event loop.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, RestrictedRegistry

from shared.runtime.logging import get_logger

if TYPE_CHECKING:
    from shared.contracts.names import Names
    from shared.runtime.metrics import Metrics

log = get_logger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

API_REQUESTS = Counter("memory_api_requests", "Requests served on a service's request list, by type and outcome "
                       "(ok, or the error code of the reply)", ["service", "type", "outcome"], registry=REGISTRY)
API_DURATION = Histogram("memory_api_request_duration_seconds", "Time from popping a request to its reply",
                         ["service", "type"], buckets=_SECONDS, registry=REGISTRY)
RETRIEVAL_MS = Histogram("memory_retrieval_duration_ms", "Long-term memory retrieval: ltm's search (service=ltm) and "
                         "the round trip chat_ai waits for before a reply (service=chat_ai), milliseconds",
                         ["service", "outcome"], buckets=(1, 2.5, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000,
                                                          2500), registry=REGISTRY)
OPERATIONS = Counter("memory_operations", "Memory operations done: messages stored, updates ingested, memories "
                     "added, searched, deleted, users deleted, ...", ["service", "operation"], registry=REGISTRY)
LLM_DURATION = Histogram("llm_call_duration_seconds", "Calls to the OpenAI-compatible LLM", ["service", "model",
                         "outcome"], buckets=_SECONDS, registry=REGISTRY)
LLM_TOKENS = Counter("llm_tokens_used", "Tokens the LLM reported (usage), prompt and completion",
                     ["service", "model", "kind"], registry=REGISTRY)
CACHE_HITS = Counter("cache_hits", "Cache lookups answered from the cache", ["service", "cache"], registry=REGISTRY)
CACHE_MISSES = Counter("cache_misses", "Cache lookups that had to load", ["service", "cache"], registry=REGISTRY)


class EventsCollector(Collector):
    """``mesh_events_total``: the in-process counters of every :class:`Metrics` of this process."""

    def __init__(self) -> None:
        self._sources: weakref.WeakSet[Metrics] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, metrics: Metrics) -> None:
        with self._lock:
            self._sources.add(metrics)

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily("mesh_events", "In-process event counters (also summed in metrics:<service>)",
                                     labels=["service", "event"])
        merged: dict[tuple[str, str], int] = {}
        with self._lock:
            sources = list(self._sources)
        for source in sources:
            for event, n in list(source.totals.items()):
                merged[(source.service, event)] = merged.get((source.service, event), 0) + n
        for (service, event), n in sorted(merged.items()):
            family.add_metric([service, event], n)
        yield family


EVENTS = EventsCollector()
REGISTRY.register(EVENTS)


class BusCollector(Collector):
    """The bus as Redis has it at scrape time. A sync client of its own (the scrape runs in the HTTP thread);
    a name the service's Redis user may not read is skipped and counted in ``mesh_bus_scrape_errors``."""

    def __init__(self, redis_url: str, streams: list[str], lists: list[str], cluster: bool = False) -> None:
        import redis

        from shared.contracts.names import Names

        client = redis.RedisCluster if cluster else redis.Redis
        self._redis = client.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.streams, self.lists = streams, lists
        self.dead = [Names.dead(n) for n in [*streams, *lists]]
        self.errors = 0

    def collect(self) -> Iterator[Metric]:
        length = GaugeMetricFamily("mesh_stream_length", "Entries in a stream (XLEN)", labels=["stream"])
        lag = GaugeMetricFamily("mesh_group_lag", "Entries of a stream a consumer group has not read yet",
                                labels=["stream", "group"])
        pending = GaugeMetricFamily("mesh_group_pending", "Entries read by a group and not acknowledged",
                                    labels=["stream", "group"])
        dead = GaugeMetricFamily("mesh_dead_letters", "Entries in a dead-letter stream", labels=["name"])
        queued = GaugeMetricFamily("mesh_request_queue_length", "Requests waiting on a request list (LLEN)",
                                   labels=["queue"])
        for stream in self.streams:
            if (n := self._try(lambda s=stream: self._redis.xlen(s))) is not None:
                length.add_metric([stream], n)
                groups: Any = self._try(lambda s=stream: self._redis.xinfo_groups(s)) if n else []
                for g in groups or []:
                    name = _text(g.get("name"))
                    lag.add_metric([stream, name], float(g.get("lag") or 0))
                    pending.add_metric([stream, name], float(g.get("pending") or 0))
        for name in self.dead:
            if (n := self._try(lambda s=name: self._redis.xlen(s))) is not None:
                dead.add_metric([name], n)
        for queue in self.lists:
            if (n := self._try(lambda q=queue: self._redis.llen(q))) is not None:
                queued.add_metric([queue], n)
        yield from (length, lag, pending, dead, queued)
        yield CounterMetricFamily("mesh_bus_scrape_errors", "Bus reads at scrape time that failed (refused by the "
                                  "ACL, Redis down)", value=self.errors)

    def _try(self, read: Any) -> Any:
        import redis

        try:
            return read()
        except redis.exceptions.RedisError:
            self.errors += 1
            return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class WithChildren:
    """The process's own registry, with the series of its children's ``/metrics`` pages (``children()``: process
    label -> URL, read at each scrape) added to the families of the same name, labelled ``process``. A child that
    does not answer within a second is left out of that scrape (``mesh_children_scrape_errors``)."""

    def __init__(self, own: CollectorRegistry, children: Callable[[], dict[str, str]]) -> None:
        self.own, self.children = own, children
        self.errors = 0

    def restricted_registry(self, names: Iterable[str]) -> RestrictedRegistry:
        """``/metrics?name[]=...`` (prometheus_client's handler asks for it)."""
        return RestrictedRegistry(names, cast(CollectorRegistry, self))  # it only calls collect()

    def collect(self) -> Iterator[Metric]:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through HTTP_PROXY
        families = {m.name: m for m in self.own.collect()}  # fresh objects at each collect: extended in place
        for process, url in sorted(self.children().items()):
            try:
                with opener.open(url, timeout=1.0) as resp:
                    parsed = list(text_string_to_metric_families(resp.read().decode()))
            except Exception:  # noqa: BLE001  (down, restarting, a cut or garbled page: left out, counted)
                self.errors += 1
                continue
            for family in parsed:  # children run without _created series (shared/runtime/children.py)
                samples = [s._replace(labels={**s.labels, "process": process}) for s in family.samples]
                mine = families.get(family.name)
                if mine is None:
                    family.samples = samples
                    families[family.name] = family
                elif mine.type == family.type:
                    mine.samples.extend(samples)
        yield from families.values()
        yield CounterMetricFamily("mesh_children_scrape_errors", "Scrapes of a worker child's /metrics that failed",
                                  value=self.errors)


class MetricsServer:
    """``/metrics`` of this process on ``host:port`` (port 0: off). ``bus``: the streams and lists to report;
    ``children``: the worker children's pages (:class:`WithChildren`)."""

    def __init__(self, host: str, port: int, bus: BusCollector | None = None,
                 children: Callable[[], dict[str, str]] | None = None) -> None:
        self.host, self.port, self.bus, self.children = host, port, bus, children
        self._server: Any = None

    def start(self) -> None:
        if not self.port:
            return
        if self.bus is not None:
            REGISTRY.register(self.bus)
        registry: Any = REGISTRY if self.children is None else WithChildren(REGISTRY, self.children)
        self._server, _thread = start_http_server(self.port, addr=self.host, registry=registry)
        log.info("metrics.serving", url=f"http://{self.host}:{self.port}/metrics")

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.bus is not None:
            try:
                REGISTRY.unregister(self.bus)
            except KeyError:
                pass


@contextmanager
def metrics_endpoint(port: int, host: str, redis_url: str, names: Names, *, cluster: bool = False, bus: bool = True,
                     children: Callable[[], dict[str, str]] | None = None) -> Iterator[MetricsServer]:
    """Serve ``/metrics`` for the life of a service's ``main`` (port 0: nothing is served). ``bus`` False: not the
    bus's gauges (a worker child: its parent reports them); ``children``: see :class:`WithChildren`."""
    collector = BusCollector(redis_url, [names.user_input, names.ai_responses, names.memory_updates],
                             [names.ltm_requests, names.memory_requests, names.chat_requests],
                             cluster) if port and bus else None
    server = MetricsServer(host, port, collector, children)
    server.start()
    try:
        yield server
    finally:
        server.close()
