"""docker-compose.yml parses, runs every service, and passes every variable the code reads."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.chat_ai.config import ChatSettings
from services.ltm.config import LtmSettings
from services.memory.config import MemorySettings
from shared.contracts.names import env_var_names
from shared.runtime.settings import MeshSettings

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"memory": MemorySettings, "ltm": LtmSettings, "chat_ai": ChatSettings}
NOT_FOR_CONTAINERS = {"CONSUMER_NAME"}  # defaults to host-pid, unique per container already


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


def test_compose_runs_redis_with_one_user_per_service() -> None:
    """The committed ACL file is what `mesh acl` generates (development passwords), compose mounts it, and each
    service logs in as its own user (the admin is the CLI's)."""
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
        user = "admin" if name == "cli" else name
        assert f"redis://{user}:${{REDIS_PASSWORD_{user.upper()}:-{user}-dev-password}}@redis" in \
            services[name]["environment"]["REDIS_URL"]
