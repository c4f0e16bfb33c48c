"""What a client's value must be before it reaches PostgreSQL.

PostgreSQL text and jsonb refuse U+0000; asyncpg cannot encode a string that is not valid
Unicode (aiohttp hands invalid UTF-8 in a header, a cookie or a command-line argument over as
lone surrogates); bigint and timestamptz hold less than Python's int and datetime. Left to the
database, each of these is a 500. The checks here say what is wrong, so that each endpoint
answers with its own 400 (or 401), and write nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime

BIGINT_MIN = -(2**63)
BIGINT_MAX = 2**63 - 1


def text_problem(value: str) -> str | None:
    """Why PostgreSQL text cannot hold `value`, or None if it can."""
    if "\x00" in value:
        return "cannot contain NUL (U+0000)"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid UTF-8"
    return None


def is_bigint(value: object) -> bool:
    """An int PostgreSQL's bigint holds (a bool or a float is not one)."""
    return type(value) is int and BIGINT_MIN <= value <= BIGINT_MAX


def in_utc(moment: datetime) -> datetime | None:
    """`moment` in UTC (a naive one is taken as UTC), or None when UTC has no such date:
    0001-01-01T00:00:00+05:00 is in year 0 there, 9999-12-31T23:00:00-05:00 in year 10000."""
    try:
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:
        return None


def is_credential(value: str) -> bool:
    """Whether `value` may be a bearer token or a session id: ours are printable ASCII, so
    anything else is refused unread (and never hashed, logged or sent to the database)."""
    return value.isascii() and value.isprintable()
