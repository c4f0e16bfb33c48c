"""The aiohttp application: what it owns, and the order its middlewares run in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Literal

import structlog
from aiohttp import web

from infra.config import Settings
from infra.database import Database, open_database
from infra.supervisor import supervised
from infra.tenants import Authenticator, IssuedToken, create_tenant
from service import audit_api, audit_web, bulk, discovery, health, limits_cost, limits_cpu, metrics
from service.feeds import wiring as feeds
from service.handlers import Handlers
from service.limits_cost import HeavyTokens
from service.middlewares import (
    bearer_auth,
    concurrency_limit,
    rate_limit,
    request_context,
    scim_errors,
    stamp_request_id,
)
from service.outcomes import PENDING_OUTCOMES, PendingOutcomes, record_outcomes
from service.scim import groups, paths, users
from service.scim.documents import ScimDocuments
from service.state import AUTHENTICATOR, DATABASE, HANDLERS, ISSUED_TOKEN, SETTINGS, SUPERVISOR
from service.streams import REQUEST_SLOTS, STREAM_SLOTS, TokenSlots

# How the app is run. "app": by a test or tool (with `database` given, the caller owns it;
# without, the app opens it). "process": the one process of `serve`, which also makes the
# first start's tenant and supervises an embedded PostgreSQL. "worker": one of
# `serve --workers N`, whose parent did both and applied the migrations.
Role = Literal["app", "process", "worker"]
_ROLE = web.AppKey("role", str)
# Whether this process runs the followers (projection runners, the feeds' background work).
_FOLLOWERS = web.AppKey("followers", bool)


def create_app(
    settings: Settings, database: Database | None = None, *, role: Role = "app"
) -> web.Application:
    """Build the app: what it owns opens and closes in its cleanup contexts, in this order
    (database and, for `serve`, its first start and supervisor; the pending audit outcomes;
    the projection runners) and closes in reverse."""
    limit = rate_limit(settings.rate_limit, settings.rate_limit_burst)
    # First of all: on `serve`, a large body leaves for the bulk process before anything reads
    # it; on the bulk process, the client's address is the one the front relayed.
    first: list[bulk.Middleware] = []
    heavy = HeavyTokens()
    front = role != "app" and settings.bulk_body_bytes > 0
    metering = front and settings.bulk_token_cpu > 0
    if front:
        first.append(bulk.forward_large(settings.bulk_body_bytes, heavy))
    elif settings.bulk_peer:
        first += [bulk.trust_front, limits_cpu.serving]
    chain: list[bulk.Middleware] = [
        *first,
        paths.canonical_spelling,  # the middlewares after it see canonical paths
        request_context,
        record_outcomes,
        scim_errors,
        bearer_auth,
        *([limits_cost.metered(heavy, settings.bulk_token_cpu)] if metering else []),
        *([limit] if limit else []),
        concurrency_limit,
    ]
    app = web.Application(middlewares=chain, client_max_size=settings.max_body_bytes)
    app.on_response_prepare.append(stamp_request_id)
    app[SETTINGS] = settings
    app[_ROLE] = role
    if metering:
        app[limits_cost.HEAVY_TOKENS] = heavy
    if settings.bulk_peer:
        app[limits_cpu.SERVING_PRIORITY] = limits_cpu.ServingPriority()
    app[_FOLLOWERS] = followers = settings.run_projections and not _has_bulk(settings, role)
    app[REQUEST_SLOTS] = TokenSlots(settings.max_concurrent_per_token, "requests")
    app[STREAM_SLOTS] = TokenSlots(settings.max_streams_per_token, "streamed replies")
    app[AUTHENTICATOR] = Authenticator(lambda: app[DATABASE].pool)
    app[PENDING_OUTCOMES] = PendingOutcomes(settings.max_queued_outcomes)
    if database is not None:
        _wire(app, database)
    else:
        app.cleanup_ctx.append(_database_ctx)
    if role == "worker" and settings.bulk_socket is not None:
        app.cleanup_ctx.append(bulk.bulk_client_ctx)  # the parent's bulk process
    if metering:  # first: before anything starts a worker thread
        app.cleanup_ctx.insert(0, limits_cost.metered_executor_ctx)
    app.cleanup_ctx.append(_pending_outcomes_ctx)  # unwound before the database closes
    if followers:
        app.cleanup_ctx.append(_projection_runners_ctx)
    app[discovery.ENABLED_RESOURCES] = ("User", "Group")
    health.add_routes(app)
    discovery.add_routes(app)
    users.add_routes(app)
    groups.add_routes(app)
    audit_api.add_routes(app)
    audit_web.add_routes(app)
    # The feeds' background work (producer, push delivery, signer processes) runs where the
    # runners do: in `serve`'s bulk process when there is one (at its lower CPU priority, so
    # POSTs on the front are not slowed by it); polls are served where they arrive.
    feeds.setup(app, background=followers)
    if settings.metrics:
        metrics.add_routes(app)
    paths.add_routes(app)  # last: other spellings of the routes above
    return app


def _has_bulk(settings: Settings, role: Role) -> bool:
    """Whether `serve` gives this process a bulk process, which then also runs the asynchronous
    projections' runners (at its lower CPU priority: folding a 2 MiB event would stall the event
    loop answering every tenant for tens of milliseconds)."""
    if role == "worker":
        return settings.bulk_socket is not None
    return role == "process" and settings.bulk_body_bytes > 0


def _wire(app: web.Application, database: Database) -> None:
    """The app's dependencies, once its database is open: the command handlers get the
    database and the SCIM layer's documents (what a PATCH does to a user or a group)."""
    app[DATABASE] = database
    app[HANDLERS] = Handlers(database, ScimDocuments())
    if not app[_FOLLOWERS]:
        database.store.recent.cap = 0  # the runners are elsewhere: keep no events for them


async def _pending_outcomes_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[PENDING_OUTCOMES].close()


async def _database_ctx(app: web.Application) -> AsyncIterator[None]:
    role = app[_ROLE]
    migrate = role != "worker"
    async with open_database(app[SETTINGS], run_migrations=migrate, serving=True) as database:
        _wire(app, database)
        if role != "process":
            yield
            return
        issued = await first_start(database)
        if issued is not None:
            app[ISSUED_TOKEN] = issued
        async with supervised(database.embedded) as supervisor:
            if supervisor is not None:
                app[SUPERVISOR] = supervisor
            async with bulk.serving_bulk(app, database.dsn, supervisor):
                yield


async def first_start(database: Database) -> IssuedToken | None:
    """Register the projections; on an empty database, create the tenant `default`."""
    from infra.ha import failover_checks
    from projections.registry import PROJECTIONS
    from projections.state import register as register_projections

    async with database.pool.acquire() as conn:
        # What a failover would lose, said once at start (`scimledger doctor` says it all).
        for check in await failover_checks(conn):
            if not check.ok:
                structlog.get_logger("scimledger.doctor").warning(
                    "database not ready for a failover", check=check.name, detail=check.detail
                )
        await register_projections(conn, list(PROJECTIONS.values()))
        has_tenant = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM tenants)")
        return None if has_tenant else await create_tenant(conn, "default")


async def _projection_runners_ctx(app: web.Application) -> AsyncIterator[None]:
    """Catch-up subscribers of the asynchronous projections (one active across instances)."""
    from projections.registry import PROJECTIONS
    from projections.runner import start_all

    stop, tasks, _ = start_all(
        app[DATABASE],
        list(PROJECTIONS.values()),
        standby_interval=app[SETTINGS].runner_standby_interval,
    )
    yield
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
