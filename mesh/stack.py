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
import ctypes
import fcntl
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import BinaryIO, Protocol

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

log = logging.getLogger(__name__)

SERVICES: dict[str, str] = {
    "memory": "services.memory",
    "ltm": "services.ltm",
    "chat_ai": "services.chat_ai",
    "gateway": "services.gateway",  # HTTP; ready when its /api/v1/health answers 200 (the others: a ping)
}
READY_PREFIX = "mesh ready:"
UP_TIMEOUT = 180.0
SERVICE_GRACE = 10.0
MIN_BACKOFF = 1.0
MAX_BACKOFF = 10.0
STABLE_AFTER = 30.0  # a service that ran this long restarts with the minimum backoff again


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class StackPaths:
    """The files of one local stack, all under its data directory (default ``.data``)."""

    root: Path

    @classmethod
    def from_arg(cls, data_dir: str | None) -> StackPaths:
        return cls(Path(data_dir or os.environ.get("MESH_DATA_DIR") or ".data").absolute())

    @property
    def env(self) -> Path:
        return self.root / "stack.env"

    @property
    def pid(self) -> Path:
        return self.root / "stack.pid"

    @property
    def log(self) -> Path:
        return self.root / "stack.log"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def service_log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    @property
    def lock(self) -> Path:
        return self.root / "stack.lock"

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    @property
    def pg(self) -> Path:
        return self.root / "pg"


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines as a dict (a value with spaces is shell-quoted, see write_env_file); {} if missing."""
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return values
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key] = " ".join(shlex.split(value)) if value[:1] in ("'", '"') else value
    return values


def write_env_file(path: Path, values: dict[str, str]) -> None:
    """Write ``KEY=value`` lines atomically (readers never see half a file); the owner's only (the URLs carry
    the Redis admin's password)."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.touch(mode=0o600)
    staging.chmod(0o600)
    staging.write_text("".join(f"{key}={shlex.quote(value) if ' ' in value else value}\n"  # `. stack.env` in sh
                               for key, value in values.items()))
    os.replace(staging, path)


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def running_stack_pid(paths: StackPaths) -> int | None:
    """The pid in ``stack.pid`` if that process is alive and is a ``mesh stack``."""
    pid = read_pid(paths.pid)
    if pid is None or not pid_alive(pid):
        return None
    cmdline = _cmdline(pid)
    if cmdline is not None and not ("mesh" in cmdline and "stack" in cmdline):
        return None  # the pid was reused by something else
    return pid


@contextmanager
def stack_lock(paths: StackPaths) -> Iterator[None]:
    """Hold ``stack.lock`` so that two stacks never share one data directory."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with paths.lock.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = read_pid(paths.pid)
            raise SystemExit(
                f"another mesh stack (pid {other}) is using {paths.root}; stop it with `python -m mesh down`"
            ) from None
        yield


# --------------------------------------------------------------------------- supervisor


def _parent_death_hook() -> Callable[[], None] | None:
    """A preexec hook (Linux) so a service gets SIGTERM if the stack itself is SIGKILLed.

    The signal fires when the *thread* that spawned the child exits: call the supervisor
    from a long-lived thread (the stack uses its main thread).
    """
    if sys.platform != "linux":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def hook() -> None:
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


@dataclass
class Service:
    """One supervised child process."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # over the supervisor's (e.g. the service's own REDIS_URL)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    backoff: float = MIN_BACKOFF
    restarts: int = 0


class Supervisor:
    """Start services, restart crashed ones with exponential backoff, stop them all."""

    def __init__(
        self,
        services: Sequence[Service],
        env: dict[str, str],
        cwd: Path,
        *,
        max_backoff: float = MAX_BACKOFF,
        stable_after: float = STABLE_AFTER,
        log_dir: Path | None = None,
    ) -> None:
        """``log_dir``: each service's output is appended to ``<log_dir>/<name>.log`` (else inherited)."""
        self.services = list(services)
        self._log_dir = log_dir
        self._env = env
        self._cwd = cwd
        self._max_backoff = max_backoff
        self._stable_after = stable_after
        self._preexec = _parent_death_hook()

    def poll(self) -> None:
        """Start what is due, notice what exited. Call it every fraction of a second."""
        now = time.monotonic()
        for service in self.services:
            if service.proc is None:
                if now >= service.restart_at:
                    self._spawn(service, now)
            elif service.proc.poll() is not None:
                self._on_exit(service, service.proc.returncode, now)

    def _open_log(self, service: Service) -> BinaryIO | None:
        if self._log_dir is None:
            return None
        self._log_dir.mkdir(parents=True, exist_ok=True)
        handle = (self._log_dir / f"{service.name}.log").open("ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"----- {stamp} mesh stack: starting {service.name} (start #{service.restarts + 1})\n".encode())
        handle.flush()
        return handle

    def _spawn(self, service: Service, now: float) -> None:
        try:
            output = self._open_log(service)
            try:
                service.proc = subprocess.Popen(
                    service.argv,
                    env={**self._env, **service.env},
                    cwd=self._cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT if output else None,
                    start_new_session=True,  # its own process group: the stack signals it, not the tty
                    preexec_fn=self._preexec,  # the stack is single-threaded
                )
            finally:
                if output:
                    output.close()  # the child has its own copy
        except OSError as exc:
            log.error("service %s could not start: %s", service.name, exc)
            self._schedule_restart(service, now)
            return
        service.started_at = now
        log.info("service %s started (pid %d): %s", service.name, service.proc.pid, " ".join(service.argv))

    def _on_exit(self, service: Service, code: int, now: float) -> None:
        uptime = now - service.started_at
        service.proc = None
        if uptime >= self._stable_after:
            service.backoff = MIN_BACKOFF
        self._schedule_restart(service, now)
        log.warning(
            "service %s exited with code %s after %.1fs; restart #%d in %.1fs",
            service.name,
            code,
            uptime,
            service.restarts,
            service.restart_at - now,
        )

    def _schedule_restart(self, service: Service, now: float) -> None:
        service.restarts += 1
        service.restart_at = now + service.backoff
        service.backoff = min(service.backoff * 2, self._max_backoff)

    def stop(self, grace: float = SERVICE_GRACE) -> None:
        """SIGTERM every service, wait up to ``grace`` seconds, SIGKILL the rest."""
        running = [s for s in self.services if s.proc is not None and s.proc.poll() is None]
        for service in running:
            log.info("stopping service %s (pid %d)", service.name, _pid(service))
            _signal_group(service, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while running and time.monotonic() < deadline:
            running = [s for s in running if s.proc is not None and s.proc.poll() is None]
            time.sleep(0.1)
        for service in running:
            log.warning("service %s ignored SIGTERM for %.0fs, killing it", service.name, grace)
            _signal_group(service, signal.SIGKILL)
        for service in self.services:
            if service.proc is not None:
                service.proc.wait()
                service.proc = None


def _pid(service: Service) -> int:
    return service.proc.pid if service.proc is not None else -1


def _signal_group(service: Service, sig: signal.Signals) -> None:
    """Signal the service's process group (it and anything it forked)."""
    try:
        os.killpg(_pid(service), sig)
    except (ProcessLookupError, PermissionError):
        pass


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


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


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
            print(f"mesh stack failed (exit {proc.returncode}); {paths.log}:\n{_tail(paths.log)}", file=sys.stderr)
            paths.pid.unlink(missing_ok=True)
            return None
        if time.monotonic() > deadline:
            print(f"mesh stack not ready after {args.timeout:.0f}s; {paths.log}:\n{_tail(paths.log)}", file=sys.stderr)
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
