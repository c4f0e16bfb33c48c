"""Structured JSON logs, one line per event, on stderr."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError


def _dumps(obj: object, default: object = None) -> str:
    return orjson.dumps(obj, default=str).decode()


class _LibraryRecords(logging.Handler):
    """Libraries' stdlib log records (asyncpg's pool retrying a lost connection, say) as our
    JSON lines: the message and the exception's type and text, never a multi-line traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, object] = {"logger": record.name}
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            fields["error"] = f"{type(error).__name__}: {error}"
        structlog.get_logger().log(record.levelno, record.getMessage(), **fields)


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
        # One write per line (print() makes two): workers sharing stderr never interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiohttp's own access log would duplicate ours (and print the raw request line).
    logging.getLogger("aiohttp.access").disabled = True
    root = logging.getLogger()
    if not any(isinstance(h, _LibraryRecords) for h in root.handlers):
        root.addHandler(_LibraryRecords())
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
