"""GET /metrics: this server's Prometheus metrics (text format), without a token.

It tells request counts and latencies per route template, event-store appends, write
conflicts and retries, each asynchronous projection's lag, and the database pool's use; no
label carries an id, a name, a tenant or a token, so the page holds nothing secret. It is on by
default and unauthenticated, like /healthz: keep it off the public load balancer (route only
/scim/ and /audit/ there) or turn it off with SCIMLEDGER_METRICS=0 (docs/operations.md).

One process is one instance. Under `serve --workers N` the workers share one
PROMETHEUS_MULTIPROC_DIR (set by the parent), and a scrape reaching any worker reports the sum
over all of them (pool gauges summed over live workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from infra import metrics as m
from infra.supervisor import SupervisorStatus
from projections import state
from projections.registry import PROJECTIONS
from service.state import DATABASE, HANDED_OFF, SETTINGS, SUPERVISOR

# Bounds the work of one scrape when a projection is far behind: the gauge then reads "at least".
_LAG_COUNT_CAP = 10_000
_LAG_SQL = """
SELECT count(*) AS events, extract(epoch FROM now() - min(recorded_at)) AS seconds
FROM (
    SELECT recorded_at FROM stored_events
    WHERE (transaction_id, notification_id) > ($1::bigint, $2::bigint)
    ORDER BY transaction_id, notification_id
    LIMIT $3
) behind
"""


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def observe_request(request: web.Request, status: int, seconds: float) -> None:
    """Count one answered request under its route template (never the raw path). Not on the
    bulk process for a request a front relayed: that front counts it (service/bulk.py); a
    connection handed over (service/bulk_handoff.py) is answered, and counted, there."""
    settings = request.app.get(SETTINGS)
    if settings is not None and settings.bulk_peer and not request.get(HANDED_OFF, False):
        return
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    key = (request.method, route, status)
    children = _CHILDREN.get(key)
    if children is None:
        children = _children(key)
    children[0].inc()
    children[1].observe(seconds)


# The labelled series of each (method, route template, status), looked up once: `labels()`
# takes a lock and builds a key on every call. Bounded: routes are templates, methods and
# statuses few; past the bound `labels()` is asked every time.
_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_CHILDREN_MAX = 4096


def _children(key: tuple[str, str, int]) -> tuple[Any, Any]:
    method, route, status = key
    children = (
        m.REQUESTS.labels(method, route, str(status)),
        m.REQUEST_SECONDS.labels(method, route),
    )
    if len(_CHILDREN) < _CHILDREN_MAX:
        _CHILDREN[key] = children
    return children


def sample_pool(pool: asyncpg.Pool) -> None:
    size = pool.get_size()
    m.POOL_SIZE.set(size)
    m.POOL_IN_USE.set(size - pool.get_idle_size())
    m.POOL_MAX.set(pool.get_max_size())


class _Lag(Collector):
    """Each asynchronous projection's distance from the head of the log, read at scrape time."""

    def __init__(self, rows: list[tuple[str, int, float]]) -> None:
        self.rows = rows

    def collect(self) -> Iterator[GaugeMetricFamily]:
        events = GaugeMetricFamily(
            "scimledger_projection_lag_events",
            "Events committed but not yet applied by the projection.",
            labels=["projection"],
        )
        seconds = GaugeMetricFamily(
            "scimledger_projection_lag_seconds",
            "Age of the oldest event the projection has not applied (0 when caught up).",
            labels=["projection"],
        )
        for name, behind, age in self.rows:
            events.add_metric([name], behind)
            seconds.add_metric([name], age)
        yield events
        yield seconds


class _Supervision(Collector):
    """The embedded PostgreSQL's supervisor (one per `serve`, its figures shared with workers)."""

    def __init__(self, status: SupervisorStatus) -> None:
        self.status = status

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "scimledger_embedded_postgres_restarts",
            "Times the embedded PostgreSQL was found not running and was restarted.",
            value=self.status.restarts,
        )
        yield CounterMetricFamily(
            "scimledger_embedded_postgres_failed_restarts",
            "Attempts to restart the embedded PostgreSQL that failed.",
            value=self.status.failed_restarts,
        )


async def _lag(pool: asyncpg.Pool) -> list[tuple[str, int, float]]:
    names = [p.name for p in PROJECTIONS.values() if p.mode == "async"]
    out = []
    async with pool.acquire() as conn:
        checkpoints = await state.checkpoints(conn, names)
        for name in names:
            after = checkpoints[name]
            row = await conn.fetchrow(_LAG_SQL, after[0], after[1], _LAG_COUNT_CAP)
            assert row is not None
            out.append((name, int(row["events"]), float(row["seconds"] or 0.0)))
    return out


def _base() -> CollectorRegistry:
    if multiprocess_dir():
        from prometheus_client import multiprocess

        base = CollectorRegistry()
        multiprocess.MultiProcessCollector(base)  # type: ignore[no-untyped-call]
        return base
    return REGISTRY


async def own_figures(request: web.Request) -> web.Response:
    """The bulk process's answer to its front's scrape (`_bulk_figures`): what this process
    counted, nothing read from the database, and no log line (the front writes the scrape's)."""
    sample_pool(request.app[DATABASE].pool)
    body = generate_latest(_base())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def metrics(request: web.Request) -> web.Response:
    pool = request.app[DATABASE].pool
    sample_pool(pool)
    base = _base()
    lag = CollectorRegistry(auto_describe=False)
    try:
        lag.register(_Lag(await _lag(pool)))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        pass  # the database is away: the process's own figures still tell something
    own = generate_latest(base)
    bulk = await _bulk_figures(request.app)
    body = (own if bulk is None else _summed(own, bulk)) + generate_latest(lag)
    supervisor = request.app.get(SUPERVISOR)
    if supervisor is not None:
        supervision = CollectorRegistry(auto_describe=False)
        supervision.register(_Supervision(supervisor))
        body += generate_latest(supervision)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _bulk_figures(app: web.Application) -> str | None:
    """`serve` as one process: what its bulk process counted (its appends, its projection
    runners), kept in that process's memory. With several workers it is in their shared
    directory already; None then, and while the bulk process is away."""
    from service.bulk import BULK_CLIENT

    session = app.get(BULK_CLIENT)
    if session is None or multiprocess_dir():
        return None
    try:
        async with session.get("http://bulk/metrics", timeout=_BULK_SCRAPE_TIMEOUT) as r:
            return await r.text() if r.status == 200 else None
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


_BULK_SCRAPE_TIMEOUT = aiohttp.ClientTimeout(total=5)


def _summed(own: bytes, bulk: str) -> bytes:
    """This process's figures with the bulk process's added in (scimledger_ families; the
    process_ and python_ ones stay this process's)."""
    try:
        families = list(text_string_to_metric_families(own.decode()))
        theirs = list(text_string_to_metric_families(bulk))
    except ValueError:
        return own
    by_name = {family.name: family for family in families}
    for family in theirs:
        mine = by_name.get(family.name)
        if mine is None or not family.name.startswith("scimledger_"):
            continue
        index = {(s.name, tuple(s.labels.items())): i for i, s in enumerate(mine.samples)}
        for sample in family.samples:
            if sample.name.endswith("_created"):  # a timestamp, not a count
                continue
            at = index.get((sample.name, tuple(sample.labels.items())))
            if at is None:
                mine.samples.append(sample)
            else:
                mine.samples[at] = mine.samples[at]._replace(
                    value=mine.samples[at].value + sample.value
                )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Parsed(families))
    return generate_latest(registry)


class _Parsed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


async def pool_sampler_ctx(app: web.Application) -> AsyncIterator[None]:
    """Under several workers, keep each worker's pool gauges fresh for scrapes of the others."""
    task: asyncio.Task[Any] | None = None
    if multiprocess_dir():

        async def sample() -> None:
            while True:
                sample_pool(app[DATABASE].pool)
                await asyncio.sleep(1.0)

        task = asyncio.get_running_loop().create_task(sample())
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(pool_sampler_ctx)
