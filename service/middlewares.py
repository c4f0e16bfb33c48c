"""Cross-cutting concerns: request ids and access log, SCIM errors, bearer-token auth."""

from __future__ import annotations

import re
import time
import uuid

import asyncpg
import structlog
from aiohttp import web

from infra.tenants import Principal, authenticate
from service.errors import ScimError
from service.metrics import observe_request
from service.outcomes import context_for, is_audited
from service.state import DATABASE, PRINCIPAL, REQUEST_CONTEXT, REQUEST_ID, Handler

log = structlog.get_logger("scimledger.http")

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Paths that answer without a token: liveness and readiness probes, metrics (see metrics.py).
_PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _audit_page(path: str) -> bool:
    """The compliance officers' web pages sign in with a cookie session (service/audit_web.py);
    the JSON API under /audit/v1/ keeps bearer tokens."""
    return path == "/audit" or (path.startswith("/audit/") and not path.startswith("/audit/v1/"))


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every request an id, and write exactly one access-log line for it."""
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _SAFE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-Id"] = request_id
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
        )


@web.middleware
async def scim_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as a SCIM Error body with application/scim+json."""
    try:
        return await handler(request)
    except ScimError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        detail = {404: "Resource not found", 405: "Method not allowed"}.get(e.status, e.reason)
        return ScimError(e.status, detail).response()
    except (
        OSError,
        asyncpg.CannotConnectNowError,
        asyncpg.InterfaceError,
        asyncpg.exceptions.ConnectionDoesNotExistError,
    ) as e:
        log.warning(
            "database unavailable", error=type(e).__name__, request_id=request.get(REQUEST_ID)
        )
        return ScimError(503, "The database is unavailable; retry later").response()
    except Exception:
        log.exception("unhandled error", request_id=request.get(REQUEST_ID))
        return ScimError(500, "Internal server error").response()


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@web.middleware
async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in _PUBLIC_PATHS or _audit_page(request.path):
        return await handler(request)
    token = _bearer(request)
    principal: Principal | None = None
    if token is not None:
        principal = await authenticate(request.app[DATABASE].pool, token)
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
