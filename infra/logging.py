"""Structured JSON logs, one line per event, on stderr."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError


def _dumps(obj: object, default: object = None) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure(level: int = logging.INFO) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiohttp's own access log would duplicate ours (and print the raw request line).
    logging.getLogger("aiohttp.access").disabled = True
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ParserRefusals) for f in server.filters):
        server.addFilter(_ParserRefusals())


class _ParserRefusals(logging.Filter):
    """aiohttp's HTTP parser answers a malformed request (invalid UTF-8 in the request line, a
    line over 8 KiB, a NUL in a header) with 400 before any handler runs, and logs the parse
    error with its traceback. That is the client's mistake, not ours: one JSON line says it
    instead, without the bytes the client sent (they may hold anything)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        structlog.get_logger("scimledger.http").info(
            "request refused by the HTTP parser", status=error.code, error=type(error).__name__
        )
        return False
