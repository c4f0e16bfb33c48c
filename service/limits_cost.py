"""A token whose requests cost the front CPU is served by the bulk process for a while.

The bulk process (service/bulk.py) takes the requests whose bodies are large, because their
cost is in their size. Some small bodies cost as much: a PATCH listing 1000 values to remove
from a user holding 1000 (45 KB, 30 ms of CPU), any write to a user of many values. The front
works on them in a worker thread, where they hold its GIL, and every tenant's requests wait
for it a few times each (bench.cost: another tenant's p99 went from 3 ms to 7.5 ms while one
tenant sent such requests among its 2 MiB bodies).

So the front meters the CPU its worker threads spend on each request (the loop's default
executor, `MeteredExecutor`), and a token one of whose requests took more than
SCIMLEDGER_BULK_TOKEN_CPU seconds has its next requests with a body sent to the bulk
process, as large bodies are, until HEAVY_FOR seconds after the last of them. A client that
keeps sending such requests costs the front one of them, not one per HEAVY_FOR: marks that
ran out each minute had the front work on one again, 30-60 ms in one piece, and a tenant
sending 200 GETs a second saw a dozen of them wait for it. Ordinary traffic (Entra's writes
are parsed on the loop, with no worker thread) is never marked.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, TypeVar

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from infra.tenants import digest
from service.state import PRINCIPAL, Handler

T = TypeVar("T")
log = structlog.get_logger("scimledger.limits")

# How long a token stays marked after its last request with a body.
HEAVY_FOR = 60.0
# Tokens remembered at once; past it the oldest mark is dropped (it is only a routing hint).
MAX_MARKED = 10_000


class Spent:
    """The worker-thread CPU seconds of one request, added to by the threads that ran it."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


_SPENT: ContextVar[Spent | None] = ContextVar("scimledger_spent", default=None)


class MeteredExecutor(ThreadPoolExecutor):
    """The loop's default executor (`asyncio.to_thread`): each call's thread CPU time is
    added to the request that submitted it (the context it was submitted from)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        spent = _SPENT.get()
        if spent is None:
            return super().submit(fn, *args, **kwargs)
        return super().submit(_metered, spent, fn, *args, **kwargs)


def charged_to(spent: Spent) -> _Charged:
    """Within: what MeteredExecutor runs for this context (a request) is added to `spent`."""
    return _Charged(spent)


class _Charged:
    """charged_to's context (a class: a generator's costs the front's every request more)."""

    __slots__ = ("_reset", "_spent")

    def __init__(self, spent: Spent) -> None:
        self._spent = spent

    def __enter__(self) -> Spent:
        self._reset = _SPENT.set(self._spent)
        return self._spent

    def __exit__(self, *exc: object) -> None:
        _SPENT.reset(self._reset)


def _metered(spent: Spent, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    started = time.thread_time()
    try:
        return fn(*args, **kwargs)
    finally:
        spent.seconds += time.thread_time() - started


class HeavyTokens:
    """Tokens (by digest) marked heavy, each until a time; oldest mark first."""

    def __init__(self, seconds: float = HEAVY_FOR, limit: int = MAX_MARKED) -> None:
        self.seconds = seconds
        self.limit = limit
        self._until: OrderedDict[bytes, float] = OrderedDict()

    def mark(self, key: bytes, now: float | None = None) -> bool:
        """Mark the token (again) from `now`; whether it was not marked before."""
        now = time.monotonic() if now is None else now
        until = self._until.pop(key, None)
        self._until[key] = now + self.seconds
        if len(self._until) > self.limit:
            self._until.popitem(last=False)
        return until is None or until <= now

    def holds(self, request: web.Request, now: float | None = None) -> bool:
        """Whether the request's bearer token is marked (no hashing while none is); if it is,
        the mark runs from `now` again: asked only of a request with a body, which goes to
        the bulk process if it is."""
        return self.holds_credentials(request.headers.get("Authorization", ""), now)

    def holds_credentials(self, authorization: str, now: float | None = None) -> bool:
        """`holds`, for the bearer token of an Authorization header's value."""
        if not self._until:
            return False
        key = bearer_key(authorization)
        if key is None:
            return False
        until = self._until.get(key)
        if until is None:
            return False
        now = time.monotonic() if now is None else now
        if until <= now:
            del self._until[key]
            return False
        # Held again from now: the token's request goes to the bulk process, not the front.
        self._until.move_to_end(key)
        self._until[key] = now + self.seconds
        return True

    def __len__(self) -> int:
        return len(self._until)


# A front's marks, where its listening sites' sniffer reads them (service/bulk_accept.py).
HEAVY_TOKENS = web.AppKey("heavy_tokens", HeavyTokens)


def bearer_key(authorization: str) -> bytes | None:
    """The digest HeavyTokens keys a bearer token by, from an Authorization header's value."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return digest(token) if scheme.lower() == "bearer" and token else None


def metered(heavy: HeavyTokens, most: float) -> Middleware:
    """The middleware (after bearer_auth) that meters each authenticated request's worker-
    thread CPU and marks its token in `heavy` when it took more than `most` seconds."""

    @web.middleware
    async def meter(request: web.Request, handler: Handler) -> web.StreamResponse:
        if PRINCIPAL not in request:
            return await handler(request)
        spent = Spent()
        try:
            with charged_to(spent):
                return await handler(request)
        finally:
            if spent.seconds > most:
                key = bearer_key(request.headers.get("Authorization", ""))
                if key is not None and heavy.mark(key):
                    log.info(
                        "token served by the bulk process",
                        tenant=request[PRINCIPAL].tenant_name,
                        cpu_ms=round(spent.seconds * 1000, 1),
                        minutes=round(heavy.seconds / 60, 1),
                    )

    return meter


async def metered_executor_ctx(app: web.Application) -> AsyncIterator[None]:
    """The loop's default executor meters what it runs (cleanup_ctx of a front process)."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(MeteredExecutor(thread_name_prefix="scimledger-worker"))
    yield
