"""docker-compose.yml parses, runs every service, and passes every variable the code reads."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from services.chat_ai.config import ChatSettings
from services.gateway.config import GatewaySettings
from services.ltm.config import LtmSettings
from services.memory.config import MemorySettings
from shared.contracts.names import env_var_names
from shared.runtime.settings import MeshSettings

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"memory": MemorySettings, "ltm": LtmSettings, "chat_ai": ChatSettings, "gateway": GatewaySettings}
NOT_FOR_CONTAINERS = {"CONSUMER_NAME"}  # defaults to host-pid, unique per container already
# where a container's value differs from the code's default on purpose: addresses, paths, log format, metrics
DEPLOYMENT = {"REDIS_URL", "DATABASE_URL", "LOG_FORMAT", "METRICS_PORT", "METRICS_HOST", "GATEWAY_HOST",
              "MEMORY_ENCRYPTION_KEY_FILE", "MEM0_DIR", "SYSTEM_PROMPT"}


def env_vars(settings: type[MeshSettings]) -> set[str]:
    return {name.upper() for name in settings.model_fields} | set(env_var_names())


def test_compose_names_every_service_and_every_variable_the_code_reads() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", *SERVICES} <= set(services)
    assert services["redis"]["image"].startswith("redis:7")
    assert services["postgres"]["image"].startswith("pgvector/pgvector:pg")
    for name, settings in SERVICES.items():
        svc = services[name]
        assert svc["command"] == ["python", "-m", f"services.{name}"]
        assert {"redis", "postgres"} <= set(svc["depends_on"])
        missing = env_vars(settings) - set(svc["environment"]) - NOT_FOR_CONTAINERS
        assert not missing, f"{name} reads {sorted(missing)} but docker-compose.yml does not pass them"
    for store in ("redis", "postgres"):
        assert "healthcheck" in services[store]


def _same(compose_default: str, code_default: object) -> bool:
    if code_default is None:
        return compose_default == ""
    if isinstance(code_default, bool):
        return compose_default.lower() == str(code_default).lower()
    if isinstance(code_default, int | float):
        return float(compose_default) == float(code_default)
    return compose_default == str(code_default)


def test_compose_defaults_are_the_codes_defaults() -> None:
    """A tuning value compose sets by itself would silently differ from what the code and the docs say (compose
    once capped CHAT_CONCURRENCY at 16 against the code's 64, which made CHAT_RECALL_CONCURRENCY bind nothing)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    differ = []
    for name, settings in SERVICES.items():
        for var, value in compose["services"][name]["environment"].items():
            field = settings.model_fields.get(var.lower())
            if field is None or var in DEPLOYMENT or value is None:
                continue
            m = re.fullmatch(r"\$\{(\w+):-(.*)\}", str(value))
            default = m.group(2) if m else str(value)
            if not _same(default, field.default):
                differ.append(f"{name} {var}: compose {default!r}, code {field.default!r}")
    assert not differ, differ


def test_compose_runs_redis_with_one_user_per_service() -> None:
    """The committed ACL file is what `mesh acl` generates (development passwords), compose mounts it, and each
    service (the gateway too) logs in as its own user (the admin is the CLI's)."""
    from mesh.acl import USERS, acl_file, dev_password
    from shared.contracts.names import Names

    committed = (ROOT / "deploy" / "redis" / "users.acl").read_text()
    assert committed == acl_file(Names(), {u: dev_password(u) for u in USERS}), \
        "deploy/redis/users.acl is stale: python -m mesh acl --out deploy/redis/users.acl"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "--aclfile" in services["redis"]["command"]
    assert any(v.endswith("users.acl:/etc/redis/users.acl:ro") for v in services["redis"]["volumes"])
    for name in (*SERVICES, "cli"):
        user = "admin" if name == "cli" else name  # the gateway has its own (mesh/acl.py)
        assert f"redis://{user}:${{REDIS_PASSWORD_{user.upper()}:-{user}-dev-password}}@redis" in \
            services[name]["environment"]["REDIS_URL"]


def _exposed_sample_names() -> set[str]:
    """Every sample name /metrics can carry: the registry's families and the bus collector's."""
    from shared.runtime import prom

    families = list(prom.REGISTRY.collect()) + list(prom.BusCollector("redis://127.0.0.1:1/0", [], []).collect())
    names = set()
    for family in families:
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def test_monitoring_profile_prometheus_and_grafana_fit_the_services() -> None:
    """Prometheus scrapes each service where compose serves /metrics; Grafana's provisioning finds the datasource
    and the dashboard where compose mounts them; every query of the dashboard names a metric the code exposes."""
    import json
    import re

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    port = compose["x-mesh-environment"]["METRICS_PORT"].split(":-")[1].rstrip("}")
    assert compose["x-mesh-environment"]["METRICS_HOST"] == "0.0.0.0"
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for cfg in job["static_configs"] for t in cfg["targets"]]
    assert sorted(targets) == sorted(f"{s}:{port}" for s in SERVICES)
    assert any(v.startswith("./deploy/prometheus.yml:/etc/prometheus/prometheus.yml") for v in
               services["prometheus"]["volumes"])

    grafana = ROOT / "deploy" / "grafana"
    datasource = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [ds] = datasource["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((grafana / "provisioning" / "dashboards" / "mesh.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in services["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in services["grafana"]["volumes"]

    dashboard = json.loads((grafana / "dashboards" / "memory-mesh.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]
    exposed = _exposed_sample_names()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", target["expr"]))
            assert used and used <= exposed, f"{panel['title']}: {sorted(used - exposed)} are not exposed"
    assert {"memory_api_requests_total", "memory_api_request_duration_seconds_bucket",
            "memory_retrieval_duration_ms_bucket", "memory_operations_total", "llm_call_duration_seconds_bucket",
            "llm_tokens_used_total", "cache_hits_total", "cache_misses_total"} <= exposed
