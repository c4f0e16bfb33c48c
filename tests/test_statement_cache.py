"""PgBouncer in transaction mode: with SCIMLEDGER_STATEMENT_CACHE_SIZE=0 the SCIM and projection
paths leave no named prepared statement behind on a server connection, so a pooled server
connection handed to another client carries nothing of ours."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from infra.config import Settings
from infra.database import Database
from infra.tenants import create_tenant, issue_token
from projections.rebuild import Rebuilder
from projections.registry import PROJECTIONS
from projections.runner import Runner
from projections.state import register
from service.app import create_app
from tests.conftest import database_on
from tests.test_entra_groups import create_group, patch_group
from tests.test_entra_users import create as create_user
from tests.test_entra_users import patch

POOL_SIZE = 3


async def prepared_statements(pool: asyncpg.Pool) -> list[str]:
    """The named prepared statements on every connection of the pool."""
    conns = [await pool.acquire() for _ in range(POOL_SIZE)]
    try:
        names: list[str] = []
        for conn in conns:
            names += [
                r["name"] for r in await conn.fetch("SELECT name FROM pg_prepared_statements")
            ]
        return names
    finally:
        for conn in conns:
            await pool.release(conn)


@pytest.fixture
async def uncached(fresh_dsn: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Database]:
    """A database whose pool was made the way `serve` makes it with the setting at 0."""
    monkeypatch.setenv("SCIMLEDGER_STATEMENT_CACHE_SIZE", "0")
    assert Settings().statement_cache_size == 0
    async with database_on(fresh_dsn, min_size=POOL_SIZE, max_size=POOL_SIZE) as db:
        yield db


async def exercise(db: Database, dsn: str, tmp: Any) -> None:
    """The write and read paths Entra uses, the async projections and a verify."""
    settings = Settings(data_dir=tmp, database_url=dsn, run_projections=False)
    async with db.pool.acquire() as conn:
        issued = await create_tenant(conn, "acme")
        reader = await issue_token(conn, "acme", "audit", "compliance")
        await register(conn, list(PROJECTIONS.values()))
    auth = {"Authorization": f"Bearer {issued.token}"}
    app = create_app(settings, db)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        user = await create_user(client, auth)
        await patch(client, auth, user["id"], {"op": "replace", "path": "title", "value": "X"})
        r = await client.get(
            '/scim/v2/Users?filter=userName eq "Test_User@contoso.com"', headers=auth
        )
        assert r.status == 200 and (await r.json(content_type=None))["totalResults"] == 1
        group = await create_group(client, auth)
        await asyncio.gather(
            *(
                patch_group(
                    client,
                    auth,
                    group["id"],
                    {"op": "Add", "path": "members", "value": [{"value": user["id"]}]},
                )
                for _ in range(2)
            )
        )
        r = await client.get(f"/scim/v2/Groups/{group['id']}", headers=auth)
        assert r.status == 200 and len((await r.json(content_type=None))["members"]) == 1
        for runner in (Runner(db, p) for p in PROJECTIONS.values() if p.mode == "async"):
            async with db.pool.acquire() as conn:
                while await runner.step(conn):
                    pass
        r = await client.get(
            "/audit/v1/entries?limit=10", headers={"Authorization": f"Bearer {reader.token}"}
        )
        assert r.status == 200 and len((await r.json())["entries"]) == 5
    for projection in PROJECTIONS.values():
        assert not (await Rebuilder(db, projection).run(dry_run=True)).drift


async def test_no_named_statement_is_left_on_a_server_connection(
    uncached: Database, fresh_dsn: str, tmp_path: Any
) -> None:
    await exercise(uncached, fresh_dsn, tmp_path)
    assert await prepared_statements(uncached.pool) == []


async def test_the_default_cache_does_leave_them(fresh_dsn: str, tmp_path: Any) -> None:
    """The check above can fail: asyncpg's default caches named statements per connection."""
    async with database_on(fresh_dsn, min_size=POOL_SIZE, max_size=POOL_SIZE) as db:
        await exercise(db, fresh_dsn, tmp_path)
        assert len(await prepared_statements(db.pool)) > 10
