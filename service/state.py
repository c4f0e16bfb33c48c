"""Typed keys for what the application and each request own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from infra.config import Settings
from infra.database import Database
from infra.supervisor import SupervisorStatus
from infra.tenants import Authenticator, IssuedToken, Principal
from service.handlers import Handlers

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
# Bearer-token checks of this process (infra.tenants.Authenticator: shared lookups, no cache).
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
# The embedded PostgreSQL's supervisor (infra.supervisor); absent with DATABASE_URL.
SUPERVISOR = web.AppKey("supervisor", SupervisorStatus)
# The token of the tenant `default`, made on the first start of an empty database (`serve`).
ISSUED_TOKEN = web.AppKey("issued_token", IssuedToken)
# The service layer's command handlers, wired to the database and the SCIM layer (service/app.py).
HANDLERS = web.AppKey("handlers", Handlers)

# An aiohttp handler, as middlewares see the rest of the chain.
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID = web.RequestKey("request_id", str)
# The client's own X-Request-Id, when it sent a safe one: kept beside ours, never instead of it.
CLIENT_REQUEST_ID = web.RequestKey("client_request_id", str)
# The client's address as the front process saw it, on a request it relayed (service/bulk.py).
RELAYED_CLIENT = web.RequestKey("relayed_client", str)
# On the bulk process: a request on a client's connection that a front handed over to it.
HANDED_OFF = web.RequestKey("handed_off", bool)
REQUEST_CONTEXT = web.RequestKey("request_context", Any)  # service.outcomes.RequestContext
PRINCIPAL = web.RequestKey("principal", Principal)
# The digest of a bearer token that could not be checked (the database away): the request's
# provisioning-log entry is written once the database is back and the token checked.
UNVERIFIED_TOKEN = web.RequestKey("unverified_token", bytes)


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def base_url(request: web.Request) -> str:
    """The SCIM base URL resources are located under (configured, or this request's host)."""
    configured = request.app[SETTINGS].public_url
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}/scim/v2"
