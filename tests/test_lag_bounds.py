"""The log's lag on request paths: the audit API's `eventsBehind` counts the tenant's own events
only, over a bounded number of rows; /metrics counts a projection's lag up to a small cap."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from uuid import UUID

import pytest
from aiohttp.test_utils import TestClient, TestServer

from infra.config import Settings
from infra.database import Database
from infra.tenants import IssuedToken, create_tenant, issue_token
from projections.registry import PROJECTIONS
from projections.state import register
from service import audit_web
from service.app import create_app
from tests.test_entra_users import create as create_user
from tests.test_metrics import scrape, value

Client = TestClient[Any, Any]
LAG_CAP = 1000  # service/audit_queries.py LAG_COUNT_CAP
METRICS_LAG_CAP = 10_000  # service/metrics.py, docs/operations.md


@pytest.fixture
async def stopped_client(settings: Settings, database: Database) -> AsyncIterator[Client]:
    """A server whose asynchronous projections are registered (checkpoint 0) but not running:
    every event stays behind."""
    async with database.pool.acquire() as conn:
        await register(conn, list(PROJECTIONS.values()))
    app = create_app(replace(settings, run_projections=False), database)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


async def store_events(database: Database, tenant_id: UUID, n: int) -> None:
    """`n` events of the tenant, appended by SQL (only counted here, never applied)."""
    await database.pool.execute(
        "INSERT INTO stored_events (originator_id, originator_version, topic, state, tenant_id)"
        " SELECT gen_random_uuid(), 1, 'test:Filler', '\\x00', $1 FROM generate_series(1, $2::int)",
        tenant_id,
        n,
    )


async def lag_of(client: Client, reader: dict[str, str]) -> dict[str, Any]:
    r = await client.get("/audit/v1/entries?limit=1", headers=reader)
    assert r.status == 200, await r.text()
    lag: dict[str, Any] = (await r.json())["lag"]
    return lag


async def test_events_behind_is_the_tenants_own_and_bounded(
    stopped_client: Client, database: Database, tenant: IssuedToken
) -> None:
    client = stopped_client
    async with database.pool.acquire() as conn:
        other = await create_tenant(conn, "globex")
        reader = await issue_token(conn, "acme", "audit", "compliance")
    mine = {"Authorization": f"Bearer {tenant.token}"}
    theirs = {"Authorization": f"Bearer {other.token}"}
    reader_auth = {"Authorization": f"Bearer {reader.token}"}

    lag = await lag_of(client, reader_auth)
    assert lag == {"eventsBehind": 0, "eventsBehindCapped": False}  # no global position
    # Another tenant's writes (and a backlog of its events) are not ours to see.
    for i in range(3):
        await create_user(client, theirs, user_name=f"u{i}@globex.com")
    await store_events(database, other.tenant_id, 2 * LAG_CAP)
    assert await lag_of(client, reader_auth) == lag
    # Ours are: the user's event and the request's record.
    await create_user(client, mine, user_name="mine@acme.com")
    assert (await lag_of(client, reader_auth))["eventsBehind"] == 2
    # Counted up to the cap, then "at least".
    await store_events(database, tenant.tenant_id, LAG_CAP)
    assert await lag_of(client, reader_auth) == {
        "eventsBehind": LAG_CAP,
        "eventsBehindCapped": True,
    }


def test_the_web_page_says_at_least_past_the_cap() -> None:
    notice = audit_web._lag_notice({"eventsBehind": LAG_CAP, "eventsBehindCapped": True})
    assert f"{LAG_CAP:,}+ events behind" in notice


async def test_metrics_count_the_lag_up_to_a_small_cap(
    stopped_client: Client, database: Database, tenant: IssuedToken
) -> None:
    await store_events(database, tenant.tenant_id, METRICS_LAG_CAP + 1)
    _, samples = await scrape(stopped_client)
    for projection in ("activity", "audit"):
        lagging = value(samples, "scimledger_projection_lag_events", projection=projection)
        assert lagging == METRICS_LAG_CAP
