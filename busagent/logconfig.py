"""structlog set-up: readable console lines on a tty, one JSON object per line otherwise."""
from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", json_output: bool | None = None, stream=None) -> None:
    """Configure structlog once for the process."""
    stream = stream or sys.stderr
    if json_output is None:
        json_output = not stream.isatty()
    renderer = (structlog.processors.JSONRenderer() if json_output
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
