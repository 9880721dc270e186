"""structlog set-up, done once at the entry point.

JSON lines when the stream is not a terminal (journald, files), a console
renderer when it is. A redaction processor blanks values of keys that look
like secrets, as a last line of defence: code should never log them at all.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

_SECRET_WORDS = ("token", "secret", "password", "jitconfig", "jit_config", "private_key", "env")


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event:
        if key != "event" and any(word in key.lower() for word in _SECRET_WORDS):
            event[key] = "[redacted]"
    return event


def configure_logging(
    level: str = "info", *, stream: Literal["stdout", "stderr"] = "stderr", json: bool | None = None
) -> None:
    """Configure structlog for the whole process.

    The stream is looked up at each call, not captured here: a logger must never
    hold on to a file object that someone else may close (and then fail the
    code that merely wanted to log).
    """
    out: TextIO = getattr(sys, stream)
    as_json = (not out.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_args: structlog.PrintLogger(file=getattr(sys, stream)),
        cache_logger_on_first_use=False,
    )
