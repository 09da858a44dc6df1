"""structlog set-up: JSON in production, console on a TTY; content kept out unless LOG_CONTENT."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_log_content = False


def configure_logging(service: str, level: str = "INFO", fmt: str = "auto", log_content: bool = False) -> None:
    global _log_content
    _log_content = log_content
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def content(text: str | None) -> Any:
    """What a log line may say about user content: the text only when LOG_CONTENT=true."""
    if text is None:
        return None
    return text if _log_content else {"chars": len(text)}


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
