"""``python -m mesh <command>``: the project's command line.

Commands live in the ``COMMANDS`` dispatch table: a help line, a function that adds the
command's options to its sub-parser, and a handler returning the exit code. Handlers of
heavy commands should import their modules inside the handler, so that ``mesh up`` and
``mesh down`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh import stack


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _lazy(module: str, name: str) -> Callable[[argparse.ArgumentParser], None]:
    """Import heavy command modules only when their command runs (keeps `mesh up` fast)."""

    def configure(parser: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(module), name)(parser)

    return configure


def _lazy_run(module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return int(importlib.import_module(module).run(args))

    return run


COMMANDS: dict[str, Command] = {
    "stack": Command(
        "run Redis, PostgreSQL and the services in the foreground (Ctrl-C stops all)",
        stack.configure_stack,
        stack.run_stack,
    ),
    "up": Command("start `mesh stack` in the background; return once every service answers ping",
                  stack.configure_up, stack.run_up),
    "down": Command("stop the background stack started by `mesh up`", stack.configure_down, stack.run_down),
    "status": Command("each service's state, version, backend; the bus's lag, pending, dead letters",
                      _lazy("mesh.status", "configure"), _lazy_run("mesh.status")),
    "eval": Command("benchmarks through the bus: `eval locomo|longmemeval --data PATH --out FILE`, `eval docs`",
                    _lazy("mesh.evals", "configure"), _lazy_run("mesh.evals")),
    "chat": Command("chat with the running mesh (interactive)", _lazy("mesh.chat", "configure"),
                    _lazy_run("mesh.chat")),
    "demo": Command("facts told in one session, recalled in another", _lazy("mesh.demo", "configure"),
                    _lazy_run("mesh.demo")),
    "config": Command("print every setting (or --write it into README.md)", _lazy("mesh.configdoc", "configure"),
                      _lazy_run("mesh.configdoc")),
    "bench": Command("the benchmark: services as processes, measured over Redis (`bench [--quick]`)",
                     _lazy("mesh.bench", "configure"), _lazy_run("mesh.bench")),
    "import": Command("load one user's chat history (JSON / JSON Lines) through memory_requests: `import FILE`",
                      _lazy("mesh.importer", "configure"), _lazy_run("mesh.importer")),
    "inspect": Command("the bus in detail: groups, lag, pending, dead letters by reason; --tail follows memory_updates",
                       _lazy("mesh.inspector", "configure"), _lazy_run("mesh.inspector")),
    "replay-dead": Command("re-queue the dead letters of a stream or request list after a fix (idempotent)",
                           _lazy("mesh.replay", "configure"), _lazy_run("mesh.replay")),
    "schema": Command("check (or --write) docs/schema/: the JSON Schema of every bus message, from the models",
                      _lazy("mesh.schemadoc", "configure"), _lazy_run("mesh.schemadoc")),
    "chaos-report": Command("the fault and bad-input tests' counts (.data/chaos-report.json) as docs/chaos.md",
                            _lazy("mesh.chaos_report", "configure"), _lazy_run("mesh.chaos_report")),
    "acl": Command("print (or --out) the Redis ACL file: one least-privilege user per service, and an admin",
                   _lazy("mesh.acl", "configure"), _lazy_run("mesh.acl")),
    "memories": Command("one user's long-term memories: `memories USER [list|search QUERY|stats|delete ID|--all]`",
                        _lazy("mesh.memories", "configure"), _lazy_run("mesh.memories")),
    "reembed": Command("embed every stored text again with EMBEDDING_MODEL (a change of model; services stopped)",
                       _lazy("mesh.reembed", "configure"), _lazy_run("mesh.reembed")),
    "docs": Command("a user's documents over the bus: `docs add PATH... --user U`, `docs search --user U QUERY`, "
                    "`docs delete --user U DOC_ID|--all`", _lazy("mesh.docs", "configure"), _lazy_run("mesh.docs")),
    "train": Command("train a model: `train salience --data PATH... --out services/ltm/salience/weights.npz`",
                     _lazy("services.ltm.salience.train", "configure"), _lazy_run("services.ltm.salience.train")),
    "delete-user": Command("delete one user everywhere: conversation store, STM, caches, long-term memory, streams",
                           _lazy("mesh.forget", "configure"), _lazy_run("mesh.forget")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mesh", description="memory mesh tooling")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, command in COMMANDS.items():
        command.configure(subparsers.add_parser(name, help=command.help, description=command.help))
    return parser


def setup_logging() -> None:
    level = logging.getLevelName(os.environ.get("LOG_LEVEL", "INFO").upper())
    logging.basicConfig(
        level=level if isinstance(level, int) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
