"""Cross-cutting concerns: request ids and access log, SCIM errors, bearer-token auth, the
per-token rate limit."""

from __future__ import annotations

import math
import os
import re
import time
import uuid

import asyncpg
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from infra.database import drop_sessions
from infra.tenants import Principal, digest
from service.boundary import is_credential
from service.errors import ScimError, scim_error_of
from service.exceptions import ServiceError
from service.metrics import observe_request
from service.outcomes import context_for, is_audited
from service.state import (
    AUTHENTICATOR,
    CLIENT_REQUEST_ID,
    DATABASE,
    PRINCIPAL,
    REQUEST_CONTEXT,
    REQUEST_ID,
    UNVERIFIED_TOKEN,
    Handler,
)
from service.streams import REQUEST_SLOTS

log = structlog.get_logger("scimledger.http")

# What a failover looks like from here: the server went away (its connections closed or
# refused, a statement cut mid-way), or the server reached is not the writable primary (a
# standby refuses writes with 25006). Each is a 503 with Retry-After, never a 500: the write
# was not acknowledged, and the client retries (on the new primary once it is promoted).
DATABASE_GONE = (
    OSError,  # TimeoutError too: connect and statement timeouts (infra/config.py)
    asyncpg.InterfaceError,
    # Class 08 (connection exception) and 57P (shutdown, cannot connect now).
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
    # A connection the server dropped mid-statement (its postmaster killed) has been seen
    # to fail so, with "cannot switch to state …; another operation is in progress"; and no
    # host of a multi-host URL is writable (TargetServerAttributeNotMatched) during a switch.
    asyncpg.InternalClientError,
    asyncpg.ReadOnlySQLTransactionError,
)
# A promotion takes about a second (docs/operations.md, measured by tests/test_failover.py).
RETRY_AFTER_SECONDS = 1

_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Paths that answer without a token: liveness and readiness probes, metrics (see metrics.py).
_PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/.well-known/jwks.json"})


def _audit_page(path: str) -> bool:
    """The compliance officers' web pages sign in with a cookie session (service/audit_web.py);
    the JSON API under /audit/v1/ keeps bearer tokens."""
    return path == "/audit" or (path.startswith("/audit/") and not path.startswith("/audit/v1/"))


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every request an id, and write exactly one access-log line for it.

    The id is always ours: it is the audit entry's change id, which a client must not forge
    or collide. A client's own X-Request-Id (safe characters, at most 64) is kept beside it.
    """
    request_id = os.urandom(16).hex()  # as random as uuid4().hex, without making a UUID
    request[REQUEST_ID] = request_id
    incoming = request.headers.get("X-Request-Id", "")
    client_request_id = incoming if _SAFE_REQUEST_ID.fullmatch(incoming) else None
    if client_request_id is not None:
        request[CLIENT_REQUEST_ID] = client_request_id
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:  # redirects of the audit pages leave as exceptions
        status = e.status
        raise
    finally:
        elapsed = time.perf_counter() - started
        observe_request(request, status, elapsed)
        principal = request.get(PRINCIPAL)
        # The query string is left out on purpose: filters carry userNames and e-mail addresses.
        log.info(
            "request",
            method=request.method,
            path=request.path,
            status=status,
            duration_ms=round(elapsed * 1000, 2),
            tenant=principal.tenant_name if principal else None,
            request_id=request_id,
            client_request_id=client_request_id,
        )


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """X-Request-Id on every reply, set as its headers are sent (on_response_prepare): a
    streamed reply (a group with its members, an export) has sent them before the
    middleware sees it."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id


@web.middleware
async def scim_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as a SCIM Error body with application/scim+json."""
    try:
        return await handler(request)
    except ScimError as e:
        return e.response()
    except ServiceError as e:
        holder = getattr(e, "holder", None)
        context = request.get(REQUEST_CONTEXT)
        if holder is not None and context is not None:
            context.error_subject = holder  # its record is sealed under its key
        return scim_error_of(e).response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        detail = {
            404: "Resource not found",
            405: "Method not allowed",
            413: f"The request body is larger than {request.client_max_size} bytes",
        }.get(e.status, e.reason)
        return ScimError(e.status, detail).response()
    except DATABASE_GONE as e:
        if _client_gone(request, e):
            # Not the database: the client closed its connection before its request was
            # whole (its body cut short). Nothing was written; no reply reaches it, but the
            # log line, the figures and the provisioning log say what happened.
            log.info("client went away", request_id=request.get(REQUEST_ID))
            return ScimError(400, CLIENT_GONE, "invalidSyntax").response()
        if isinstance(e, asyncpg.ReadOnlySQLTransactionError):
            # The server this connection reached is a standby now (demoted, or a URL naming
            # it): drop every pooled connection; new ones go to the writable primary
            # (target_session_attrs=read-write in the URL).
            await drop_sessions(request.app[DATABASE].pool)
        log.warning(
            "database unavailable", error=type(e).__name__, request_id=request.get(REQUEST_ID)
        )
        return ScimError(
            503,
            "The database is unavailable; retry later",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        ).response()
    except Exception:
        log.exception("unhandled error", request_id=request.get(REQUEST_ID))
        return ScimError(500, "Internal server error").response()


CLIENT_GONE = "The client closed the connection before the request was complete"


def _client_gone(request: web.Request, error: BaseException) -> bool:
    """Whether `error` is aiohttp's word that the client's connection was lost mid-request
    (its transport gone), rather than a connection to the database."""
    transport = request.transport
    return isinstance(error, ConnectionResetError) and (transport is None or transport.is_closing())


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or not is_credential(token):
        return None
    return token


@web.middleware
async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in _PUBLIC_PATHS or _audit_page(request.path):
        return await handler(request)
    token = _bearer(request)
    principal: Principal | None = None
    if token is not None:
        try:
            principal = await request.app[AUTHENTICATOR](token)
        except DATABASE_GONE:
            request[UNVERIFIED_TOKEN] = digest(token)  # never the token: see record_outcomes
            raise
    if principal is None:
        raise ScimError(
            401,
            "A valid bearer token is required",
            headers={"WWW-Authenticate": 'Bearer realm="scimledger"'},
        )
    if principal.role != "provisioning" and request.path.startswith("/scim/"):
        raise ScimError(403, "This token may not use the SCIM API")
    if principal.role != "audit" and request.path.startswith("/audit/"):
        raise ScimError(403, "Only an audit token may read the provisioning log")
    request[PRINCIPAL] = principal
    if is_audited(request):
        request[REQUEST_CONTEXT] = context_for(request)  # type: ignore[misc]
    return await handler(request)


class TokenBuckets:
    """Per-token rate limit: a token bucket per bearer token, in this process's memory.

    Each token may send `rate` requests per second on average and `burst` at once. The state
    is per instance: with N instances behind a load balancer a token gets up to N x the rate,
    which is fine for a guard against runaway clients (Entra stays near 25 requests/s per
    tenant). Keys are token ids of authenticated requests, so the table grows only with the
    tokens that exist.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1))
        self._buckets: dict[uuid.UUID, tuple[float, float]] = {}

    def take(self, key: uuid.UUID, now: float | None = None) -> float:
        """0 if the request may go, else the seconds until the bucket holds one again."""
        now = time.monotonic() if now is None else now
        tokens, stamp = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


def rate_limit(rate: float, burst: int) -> Middleware | None:
    """The rate-limit middleware (it runs after bearer_auth), or None when `rate` is 0.

    A refused request gets 429 with Retry-After and is not recorded in the provisioning log:
    recording it would cost the database write that the limit is there to spare.
    """
    if rate <= 0:
        return None
    buckets = TokenBuckets(rate, burst)

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        principal = request.get(PRINCIPAL)
        if principal is not None:
            wait = buckets.take(principal.token_id)
            if wait > 0:
                request.pop(REQUEST_CONTEXT, None)
                raise ScimError(
                    429,
                    f"Too many requests for this token (limit {rate:g}/s); retry later",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        return await handler(request)

    return limit


@web.middleware
async def concurrency_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The per-token cap on requests in flight (it runs after bearer_auth; 0 means none).

    Below the pool's size, it keeps one token's slow requests (expensive filters, streams to
    a client that does not read) from holding every connection. A refused request gets 429
    with Retry-After and is not recorded in the provisioning log, like the rate limit's.
    """
    principal = request.get(PRINCIPAL)
    slots = request.app[REQUEST_SLOTS]
    if principal is None or slots.limit <= 0:
        return await handler(request)
    if slots.full(principal.token_id):
        request.pop(REQUEST_CONTEXT, None)
    slots.take(principal.token_id)
    try:
        return await handler(request)
    finally:
        slots.give(principal.token_id)
