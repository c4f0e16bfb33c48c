"""Replies that one client cannot use to hold the service: per-token caps and bounded writes.

A streamed reply (a group's members, an audit export) reads the database in short pages, each
in its own connection acquisition, and writes between them holding no connection; see
service/scim/groups.py and service/audit_api.py. What is left for a client that never reads is
its own reply: each write may wait for it `SCIMLEDGER_SLOW_CLIENT_TIMEOUT` seconds, then the
reply is cut (the client sees a truncated body, never a wrong one) and the socket closed.
A token may have `SCIMLEDGER_MAX_STREAMS_PER_TOKEN` such replies and
`SCIMLEDGER_MAX_CONCURRENT_PER_TOKEN` requests of any kind in flight; past either, 429.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from uuid import UUID

import asyncpg
import structlog
from aiohttp import web

from service.errors import ScimError
from service.state import PRINCIPAL, REQUEST_ID, SETTINGS

log = structlog.get_logger("scimledger.http")


class TokenSlots:
    """At most `limit` holders at once per token, in this process's memory (like the rate
    limit: with N instances a token gets up to N x the cap). 0 means no cap. The table holds
    only tokens with something in flight."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self._held: dict[UUID, int] = {}

    def full(self, token_id: UUID) -> bool:
        return 0 < self.limit <= self._held.get(token_id, 0)

    @contextmanager
    def hold(self, token_id: UUID) -> Iterator[None]:
        self.take(token_id)
        try:
            yield
        finally:
            self.give(token_id)

    def take(self, token_id: UUID) -> None:
        """One more holder for the token (429 when it is full); `give` it back once done."""
        if self.full(token_id):
            raise ScimError(
                429,
                f"Too many {self.what} in flight for this token (limit {self.limit}); retry later",
                headers={"Retry-After": "1"},
            )
        self._held[token_id] = self._held.get(token_id, 0) + 1

    def give(self, token_id: UUID) -> None:
        left = self._held[token_id] - 1
        if left:
            self._held[token_id] = left
        else:
            del self._held[token_id]


# Requests in flight per token (SCIMLEDGER_MAX_CONCURRENT_PER_TOKEN): bearer-token requests in
# a middleware (service/middlewares.py), the audit web pages once their session is known.
REQUEST_SLOTS = web.AppKey("request_slots", TokenSlots)
# Streamed replies in flight per token (SCIMLEDGER_MAX_STREAMS_PER_TOKEN).
STREAM_SLOTS = web.AppKey("stream_slots", TokenSlots)


class ClientTooSlow(Exception):
    """A write waited longer than the slow-client timeout, or the client went away."""


class StreamCut(Exception):
    """The reply cannot be finished (e.g. the group changed while its members were sent)."""


# What ends a reply early in the normal course of things (anything else is logged with its
# traceback): the client, or the database a next page is read from.
_EXPECTED_CUTS = (
    ClientTooSlow,
    StreamCut,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


class Stream:
    """A prepared reply whose every write must be taken by the client within `timeout`."""

    def __init__(self, request: web.Request, response: web.StreamResponse, timeout: float):
        self.request = request
        self.response = response
        self.timeout = timeout

    async def write(self, data: bytes) -> None:
        if not data:
            return
        try:
            await asyncio.wait_for(self.response.write(data), self.timeout)
        except TimeoutError:
            raise ClientTooSlow(f"a write waited more than {self.timeout:g} s") from None
        except ConnectionError:
            raise ClientTooSlow("the client closed the connection") from None


@asynccontextmanager
async def streaming(
    request: web.Request, response: web.StreamResponse, *, capped: bool = True
) -> AsyncIterator[Stream]:
    """Take one of the token's stream slots (429 past the cap), prepare `response`, and end it:
    with write_eof, or, when the client is too slow or the reply cannot be finished, by
    closing the socket so the client never takes a truncated body for a whole one.

    `capped=False` for the reply to a write that is done: it is never refused (a 429 would
    make the client retry a write that succeeded), only counted while the cap has room."""
    slots = request.app[STREAM_SLOTS]
    token_id = request[PRINCIPAL].token_id
    with slots.hold(token_id) if capped or not slots.full(token_id) else nullcontext():
        await response.prepare(request)
        stream = Stream(request, response, request.app[SETTINGS].slow_client_timeout)
        try:
            yield stream
            await asyncio.wait_for(response.write_eof(), stream.timeout)
        except Exception as e:
            # The status line is out: a failure now (the client, the database for a next
            # page, or a bug) can only end the reply early, and it must look unfinished. It
            # must not leave this block either: the SCIM error middleware would write a second
            # reply into the first.
            if request.transport is not None:
                request.transport.abort()
            log.warning(
                "stream cut",
                path=request.path,
                reason=str(e) or type(e).__name__,
                request_id=request.get(REQUEST_ID),
                exc_info=not isinstance(e, _EXPECTED_CUTS),
            )
