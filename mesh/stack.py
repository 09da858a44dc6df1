"""Run the mesh locally: ``python -m mesh stack`` (foreground), ``up`` (background), ``down``.

``stack`` uses REDIS_URL / DATABASE_URL from the environment when set, else starts an
embedded Redis and PostgreSQL (+pgvector) with their data under ``.data/``. It writes
``.data/stack.env`` (``REDIS_URL=...`` and ``DATABASE_URL=...``; ``set -a; . .data/stack.env``
then ``redis-cli -u "$REDIS_URL"`` / ``psql "$DATABASE_URL"``), prints ``mesh ready: ...``,
then runs the services as child processes, each writing to ``.data/logs/<service>.log``,
and restarts any that crash (exponential backoff, capped). ``up`` returns once every
service answers ``ping`` over the bus (mesh/ready.py), else fails naming the service
and its log. SIGINT/SIGTERM: SIGTERM the services, SIGKILL what is left after the
grace period, then stop the data stores it started.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Protocol

from mesh.infra import (
    free_port,
    pid_alive,
    port_is_free,
    read_pid,
    redact_url,
    redis_os_user,
    url_port,
    wait_for_postgres,
    wait_for_redis,
)
from mesh.pg_roles import APP_ROLE, ensure_app_role
from mesh.postgres_server import PostgresServer
from mesh.redis_server import RedisServer
from mesh.stack_files import StackPaths, read_env_file, running_stack_pid, stack_lock, tail, write_env_file
from mesh.supervisor import MAX_BACKOFF, MIN_BACKOFF, Service, Supervisor

log = logging.getLogger(__name__)

SERVICES: dict[str, str] = {
    "memory": "services.memory",
    "ltm": "services.ltm",
    "chat_ai": "services.chat_ai",
    "gateway": "services.gateway",  # HTTP; ready when its /api/v1/health answers 200 (the others: a ping)
}
READY_PREFIX = "mesh ready:"
UP_TIMEOUT = 180.0


# --------------------------------------------------------------------------- stack


class StopFlag:
    """Set by SIGINT/SIGTERM/SIGHUP; the main loop polls it."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            log.warning("already stopping, please wait")
        else:
            log.info("received %s, stopping", signal.Signals(signum).name)
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float) -> bool:
        return self.event.wait(timeout)


class Stoppable(Protocol):
    def stop(self) -> None: ...


def _reusable_port(previous_url: str | None) -> int | None:
    """The port of the previous run, if that port is free now."""
    port = url_port(previous_url) if previous_url else None
    return port if port and port_is_free(port) else None


def _start_embedded(
    make: Callable[[int | None], RedisServer | PostgresServer], previous_url: str | None
) -> tuple[str, Stoppable]:
    """Start an embedded server, on the previous run's port if that is free.

    A server that a SIGKILLed stack left running is stopped first: it holds that port.
    """
    make(None).stop()
    port = _reusable_port(previous_url)
    server = make(port)
    try:
        return server.start(), server
    except RuntimeError as exc:
        if port is None or "Address already in use" not in str(exc):
            raise
        log.info("port %d was taken meanwhile; using another one", port)
    server = make(None)
    return server.start(), server


def _redis_users(paths: StackPaths) -> tuple[Path, dict[str, str]]:
    """The stack's own Redis gets a user per service (mesh/acl.py), with new random passwords each start; the file
    and the URLs that carry them are the owner's only."""
    from mesh.acl import acl_file, random_passwords
    from shared.contracts.names import Names

    passwords = random_passwords()
    path = paths.root / "redis-users.acl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(acl_file(Names.from_env(), passwords))
    return path, passwords


def _pg_password(paths: StackPaths, name: str = "pg-password") -> str:
    """A local PostgreSQL password: made once, kept in ``<data>/<name>`` (the owner's only); ``pg-password`` is the
    superuser's, ``pg-app-password`` the services' role's (mesh/pg_roles.py)."""
    import secrets

    path = paths.root / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24))
    path.chmod(0o600)
    return path.read_text().strip()


def start_stores(paths: StackPaths, started: list[Stoppable]) -> tuple[str, str, dict[str, str]]:
    """Return (REDIS_URL, DATABASE_URL, each service's REDIS_URL); start embedded servers where none is given. An
    embedded Redis runs with ACLs (REDIS_URL is then its admin user); a given REDIS_URL is used by every service."""
    previous = read_env_file(paths.env)
    redis_url = os.environ.get("REDIS_URL")
    service_urls: dict[str, str] = {}
    if redis_url:
        log.info("using REDIS_URL from the environment: %s", redact_url(redis_url))
        wait_for_redis(redis_url, 15)
    else:
        acl, passwords = _redis_users(paths)
        redis_url, redis = _start_embedded(
            lambda port: RedisServer(paths.redis, port=port, acl_file=acl, admin=("admin", passwords["admin"]),
                                     os_user=redis_os_user(paths.redis)),
            previous.get("REDIS_URL"))
        started.append(redis)
        assert isinstance(redis, RedisServer)
        service_urls = {name: redis.url_as(name, passwords[name]) for name in SERVICES if name in passwords}
    database_url = os.environ.get("DATABASE_URL")
    if database_url:
        log.info("using DATABASE_URL from the environment: %s", redact_url(database_url))
        wait_for_postgres(database_url, 30)
    else:
        database_url, pg = _start_embedded(
            lambda port: PostgresServer(paths.pg, port=port, password=_pg_password(paths)), previous.get("DATABASE_URL")
        )
        started.append(pg)
        assert isinstance(pg, PostgresServer)
        # the services (and stack.env) get a role that owns the mesh's database and nothing more
        database_url = ensure_app_role(database_url, pg.dbname, _pg_password(paths, "pg-app-password"))
        log.info("services log in to PostgreSQL as %s (not a superuser)", APP_ROLE)
    return redis_url, database_url, service_urls


def _gateway_env(names: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The gateway's env (a free port; an admin API key made for this run unless GATEWAY_API_KEYS is set) and what
    stack.env says of it (GATEWAY_URL, and GATEWAY_API_KEY when the key was made here)."""
    if "gateway" not in names:
        return {}, {}
    import secrets

    port = free_port()
    env = {"GATEWAY_PORT": str(port), "GATEWAY_HOST": "127.0.0.1"}
    shown = {"GATEWAY_URL": f"http://127.0.0.1:{port}"}
    if not os.environ.get("GATEWAY_API_KEYS"):
        key = secrets.token_urlsafe(24)
        env["GATEWAY_API_KEYS"] = f"{key}=admin"
        shown["GATEWAY_API_KEY"] = key
    return env, shown


def parse_services(spec: str) -> list[str]:
    names = [name.strip().replace("-", "_") for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in SERVICES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown service(s) {unknown}; choose from {sorted(SERVICES)}")
    return names


def _service_env(redis_url: str, database_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(REDIS_URL=redis_url, DATABASE_URL=database_url)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class StoreGuard:
    """An embedded store (Redis, PostgreSQL) that dies is restarted on the port it had, so the services, which
    reconnect on their own, find it at the URL they were given; each death and return is logged as an error /
    warning in the stack's log, and a failed restart is retried with back-off (capped)."""

    def __init__(self, name: str, server: RedisServer | PostgresServer) -> None:
        self.name, self.server = name, server
        self.restarts, self.backoff, self.retry_at = 0, MIN_BACKOFF, 0.0
        self.down_since: float | None = None
        server.keep_port()

    def poll(self, now: float) -> None:
        if self.server.is_running():
            return
        if self.down_since is None:
            self.down_since = now
            log.error("%s at %s is down (exited or killed); restarting it on the same port", self.name,
                      redact_url(self.server.url))
        if now < self.retry_at:
            return
        try:
            self.server.start()
        except (RuntimeError, TimeoutError) as exc:
            self.retry_at = now + self.backoff
            self.backoff = min(self.backoff * 2, MAX_BACKOFF)
            log.error("%s could not be restarted (retry in %.0fs): %s", self.name, self.retry_at - now, exc)
            return
        self.restarts += 1
        log.warning("%s is back at %s after %.1fs down (restart #%d)", self.name, redact_url(self.server.url),
                    time.monotonic() - self.down_since, self.restarts)
        self.down_since, self.backoff, self.retry_at = None, MIN_BACKOFF, 0.0


def _supervise(names: list[str], env: dict[str, str], stop: StopFlag, log_dir: Path,
               stores: list[StoreGuard] | None = None, own_env: dict[str, dict[str, str]] | None = None) -> None:
    """``own_env``: what each service's environment has beyond ``env`` (its REDIS_URL when the stack's Redis has
    ACLs, its METRICS_PORT, the gateway's port and key)."""
    own = own_env or {}
    supervisor = Supervisor([Service(name, [sys.executable, "-m", SERVICES[name]], own.get(name, {}))
                             for name in names], env, Path.cwd(), log_dir=log_dir)
    try:
        while not stop.is_set():
            for store in stores or ():
                store.poll(time.monotonic())
            supervisor.poll()
            stop.wait(0.5)
    finally:
        supervisor.stop()


def _stop_all(started: list[Stoppable]) -> None:
    for server in reversed(started):
        try:
            server.stop()
        except Exception:  # stop the others anyway
            log.exception("could not stop %s", type(server).__name__)


def run_stack(args: argparse.Namespace) -> int:
    paths = StackPaths.from_arg(args.data_dir)
    stop = StopFlag()
    stop.install()
    with stack_lock(paths):
        paths.pid.write_text(f"{os.getpid()}\n")
        started: list[Stoppable] = []
        try:
            redis_url, database_url, service_urls = start_stores(paths, started)
            pg = [server.url for server in started if isinstance(server, PostgresServer)]
            names = [] if args.no_services else args.services
            metrics_ports = {name: free_port() for name in names}  # each service's Prometheus /metrics
            gateway_env, gateway_vars = _gateway_env(names)
            # DATABASE_URL: the services' role; DATABASE_ADMIN_URL: the superuser, for tools that create databases
            write_env_file(paths.env, {"REDIS_URL": redis_url, "DATABASE_URL": database_url,
                                       **({"DATABASE_ADMIN_URL": pg[0]} if pg else {}),
                                       "METRICS_URLS": " ".join(f"http://127.0.0.1:{p}/metrics"
                                                                for p in metrics_ports.values()), **gateway_vars})
            print(
                f"{READY_PREFIX} REDIS_URL={redact_url(redis_url)} DATABASE_URL={redact_url(database_url)}", flush=True
            )
            log.info('attach with: set -a; . %s; redis-cli -u "$REDIS_URL"; psql "$DATABASE_URL"', paths.env)
            if names:
                log.info("service logs: %s", ", ".join(str(paths.service_log(name)) for name in names))
            guards = [StoreGuard("redis-server" if isinstance(server, RedisServer) else "PostgreSQL", server)
                      for server in started if isinstance(server, RedisServer | PostgresServer)]
            own_env = {name: {**({"REDIS_URL": service_urls[name]} if name in service_urls else {}),
                              "METRICS_PORT": str(metrics_ports[name]), **(gateway_env if name == "gateway" else {})}
                       for name in names}
            _supervise(names, _service_env(redis_url, database_url), stop, paths.logs, guards, own_env)
        except (RuntimeError, TimeoutError) as exc:
            log.error("%s", exc)
            return 1
        finally:
            _stop_all(started)
            if read_pid(paths.pid) == os.getpid():
                paths.pid.unlink(missing_ok=True)
    log.info("mesh stack stopped")
    return 0


# --------------------------------------------------------------------------- up / down


def _stack_argv(args: argparse.Namespace, paths: StackPaths) -> list[str]:
    argv = [sys.executable, "-m", "mesh", "stack", "--data-dir", str(paths.root)]
    if args.no_services:
        argv.append("--no-services")
    else:
        argv += ["--services", ",".join(args.services)]
    return argv



def _print_urls(paths: StackPaths) -> None:
    """The URLs without their passwords (they are in the env file, the owner's only)."""
    for key, value in read_env_file(paths.env).items():
        print(f"{key}={'***' if key.endswith('_KEY') else redact_url(value)}")
    print(f'with the passwords: set -a; . {paths.env}; redis-cli -u "$REDIS_URL"')


def _log_has_ready_line(path: Path) -> bool:
    try:
        return any(line.startswith(READY_PREFIX) for line in path.read_text(errors="replace").splitlines())
    except OSError:
        return False


def _wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


def _start_stack(args: argparse.Namespace, paths: StackPaths, deadline: float) -> int | None:
    """Start ``mesh stack`` in the background; its pid once the stores are up, None if it failed."""
    paths.root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with paths.log.open("wb") as log_file:
        proc = subprocess.Popen(
            _stack_argv(args, paths),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    paths.pid.write_text(f"{proc.pid}\n")
    while not _log_has_ready_line(paths.log):
        if proc.poll() is not None:
            print(f"mesh stack failed (exit {proc.returncode}); {paths.log}:\n{tail(paths.log)}", file=sys.stderr)
            paths.pid.unlink(missing_ok=True)
            return None
        if time.monotonic() > deadline:
            print(f"mesh stack not ready after {args.timeout:.0f}s; {paths.log}:\n{tail(paths.log)}", file=sys.stderr)
            _terminate_stack(paths, proc.pid, 60.0)
            return None
        time.sleep(0.2)
    return proc.pid


def _services_ready(paths: StackPaths, pid: int, services: list[str], deadline: float) -> bool:
    from mesh.ready import wait_for_services  # asyncio and the Redis client only from here on

    return wait_for_services(paths, pid, services, deadline)


def run_up(args: argparse.Namespace) -> int:
    """Start the stack (unless it runs) and return once every service answers ``ping``; 1 if one does not."""
    paths = StackPaths.from_arg(args.data_dir)
    deadline = time.monotonic() + args.timeout
    pid = running_stack_pid(paths)
    ours = pid is None
    if pid is not None:
        print(f"mesh stack already running (pid {pid}); log {paths.log}")
    else:
        pid = _start_stack(args, paths, deadline)
        if pid is None:
            return 1
    services = [] if args.no_services else list(args.services)
    if services and not _services_ready(paths, pid, services, deadline):
        if ours:
            print("mesh up: stopping the stack it started", file=sys.stderr)
            _terminate_stack(paths, pid, 60.0)
        return 1
    print(f"mesh stack up (pid {pid}); log {paths.log}; stop with `python -m mesh down`")
    _print_urls(paths)
    return 0


def _stop_leftover_stores(paths: StackPaths) -> None:
    """Stop data stores a SIGKILLed stack left running on this data directory."""
    if paths.pg.exists():
        PostgresServer(paths.pg).stop()
    if paths.redis.exists():
        RedisServer(paths.redis).stop()


def _terminate_stack(paths: StackPaths, pid: int, timeout: float) -> None:
    os.kill(pid, signal.SIGTERM)
    if not _wait_for_exit(pid, timeout):
        log.warning("stack pid %d still running after %.0fs; killing it", pid, timeout)
        os.kill(pid, signal.SIGKILL)
        _wait_for_exit(pid, 5.0)
    _stop_leftover_stores(paths)
    paths.pid.unlink(missing_ok=True)


def run_down(args: argparse.Namespace) -> int:
    paths = StackPaths.from_arg(args.data_dir)
    pid = running_stack_pid(paths)
    if pid is None:
        _stop_leftover_stores(paths)
        paths.pid.unlink(missing_ok=True)
        print("mesh stack is not running")
        return 0
    print(f"stopping mesh stack (pid {pid})")
    _terminate_stack(paths, pid, args.timeout)
    print("mesh stack stopped")
    return 0


# --------------------------------------------------------------------------- argparse


def add_data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", default=None, help="where data, stack.env, stack.log live (default $MESH_DATA_DIR or .data)"
    )


def add_service_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--services",
        type=parse_services,
        default=list(SERVICES),
        help=f"comma-separated services to run (default {','.join(SERVICES)})",
    )
    group.add_argument("--no-services", action="store_true", help="start only Redis and PostgreSQL")


def configure_stack(parser: argparse.ArgumentParser) -> None:
    add_data_dir_option(parser)
    add_service_options(parser)


def configure_up(parser: argparse.ArgumentParser) -> None:
    configure_stack(parser)
    parser.add_argument("--timeout", type=float, default=UP_TIMEOUT,
                        help="seconds to wait until every service answers ping")


def configure_down(parser: argparse.ArgumentParser) -> None:
    add_data_dir_option(parser)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait before SIGKILL")
