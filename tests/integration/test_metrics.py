"""The Prometheus side of shared/runtime/prom.py in process: LLM calls timed and their tokens counted through a
fake OpenAI-compatible server, in-process counters and the bus's health on a served /metrics page."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from mesh.infra import free_port
from shared.contracts import Names
from shared.runtime import prom
from shared.runtime.llm import OpenAIChatModel
from shared.runtime.metrics import Metrics
from tests.fake_llm import fake_llm
from tests.integration.test_ready import scrape, total


def _count(name: str, *labels: str) -> float:
    return prom.REGISTRY.get_sample_value(name, dict(zip(("service", "model", "outcome"), labels, strict=False))) or 0


async def test_llm_calls_are_timed_and_failures_labelled() -> None:
    service = f"svc-{uuid.uuid4().hex[:6]}"
    with fake_llm(lambda body: "fine") as (url, _seen):
        model = OpenAIChatModel(api_key=None, base_url=url, model="fake-model", service=service)
        assert await model.complete([{"role": "user", "content": "hi"}]) == "fine"
        await model.close()
    assert _count("llm_call_duration_seconds_count", service, "fake-model", "ok") == 1
    tokens = prom.REGISTRY.get_sample_value("llm_tokens_used_total",
                                            {"service": service, "model": "fake-model", "kind": "prompt"})
    assert tokens is not None  # the series exists (the fake server reports zero usage)
    with fake_llm(lambda body: "never", status=500) as (url, _seen):
        model = OpenAIChatModel(api_key=None, base_url=url, model="fake-model", service=service)
        with pytest.raises(Exception):  # noqa: B017 - openai's InternalServerError
            await model.complete([{"role": "user", "content": "hi"}])
        await model.close()
    assert _count("llm_call_duration_seconds_count", service, "fake-model", "InternalServerError") == 1


async def test_a_served_page_has_the_events_and_the_bus(redis: aioredis.Redis, redis_url: str, names: Names) -> None:
    metrics = Metrics(service=f"probe-{uuid.uuid4().hex[:6]}")
    metrics.incr("processed", 3)
    metrics.incr("rejected.invalid_json")
    await redis.xadd(names.user_input, {"data": "{}"}, maxlen=10)
    await redis.xgroup_create(names.user_input, "memory", id="$")
    await redis.xadd(names.user_input, {"data": "{}"}, maxlen=10)  # one unread by the group: lag 1
    await redis.rpush(names.ltm_requests, "{}")
    port = free_port()
    with prom.metrics_endpoint(port, "127.0.0.1", redis_url, names):
        samples = await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
    assert total(samples, "mesh_events_total", service=metrics.service, event="processed") == 3
    assert total(samples, "mesh_events_total", service=metrics.service, event="rejected.invalid_json") == 1
    assert total(samples, "mesh_stream_length", stream=names.user_input) == 2
    assert total(samples, "mesh_group_lag", stream=names.user_input, group="memory") == 1
    assert total(samples, "mesh_request_queue_length", queue=names.ltm_requests) == 1
    assert samples[("mesh_dead_letters", (("name", Names.dead(names.memory_updates)),))] == 0
    await redis.delete(names.user_input, names.ltm_requests)
