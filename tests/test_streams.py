"""One token must not hold the pool: streamed replies to clients that never read, and per-token
caps on streams and on requests in flight.

The stalled clients are raw sockets with a small receive buffer that send a request and never
read; the replies are large enough (several MB) that the kernel's buffers fill and the server's
writes wait. Settings come from the environment (as `serve` reads them)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from infra.config import Settings
from infra.database import Database, create_pool
from infra.eventstore import EventStore
from infra.tenants import IssuedToken, create_tenant, issue_token
from service.app import create_app
from tests.test_entra_groups import PATCH_OP, create_group
from tests.test_entra_users import create as create_user
from tests.test_entra_users import headers
from tests.test_runner import eventually

Client = TestClient[Any, Any]
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
POOL = 3
MEMBERS = 30_000  # about 7 MB of members with their displays: more than the socket buffers


def env(**values: str) -> pytest.MarkDecorator:
    """The environment (SCIMLEDGER_* settings) of the test's server."""
    return pytest.mark.parametrize("served", [values], indirect=True)


@dataclass
class Served:
    client: Client
    pool: asyncpg.Pool
    port: int
    a: dict[str, str]  # tenant A's provisioning token
    b: dict[str, str]  # tenant B's provisioning token
    tenant_a: IssuedToken


@pytest.fixture
async def served(
    fresh_dsn: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> AsyncIterator[Served]:
    """A server with a pool of POOL connections (a wait for one gives up after 5 s: a 503) and
    the environment the test gives (parametrized); tenants A and B."""
    for name, value in request.param.items():
        monkeypatch.setenv(name, value)
    settings = Settings(
        data_dir=tmp_path, database_url=fresh_dsn, rate_limit=0, run_projections=False
    )
    pool = await create_pool(fresh_dsn, min_size=1, max_size=POOL, acquire_timeout=5.0)
    store = EventStore(pool)
    database = Database(dsn=fresh_dsn, pool=pool, store=store, embedded=None)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(pool.close)
        stack.push_async_callback(store.close)
        async with pool.acquire() as conn:
            a = await create_tenant(conn, "tenant-a")
            b = await create_tenant(conn, "tenant-b")
        app = create_app(settings, database)
        client = await stack.enter_async_context(TestClient(TestServer(app, host="127.0.0.1")))
        port = client.server.port
        assert port is not None
        yield Served(
            client,
            pool,
            port,
            {"Authorization": f"Bearer {a.token}"},
            {"Authorization": f"Bearer {b.token}"},
            a,
        )


async def big_group(served: Served) -> str:
    """Tenant A's group of MEMBERS members, each with a 100-character display. The users are
    rows of the users view (as tests/test_filter.py seeds them); the group is built by PATCH."""
    ids = [uuid.uuid4() for _ in range(MEMBERS)]
    await served.pool.execute(
        "INSERT INTO scim_users (tenant_id, id, user_name, active, resource, version, created,"
        " last_modified) SELECT $1, id, id::text, true, '{}', 1, now(), now()"
        " FROM unnest($2::uuid[]) id",
        served.tenant_a.tenant_id,
        ids,
    )
    group = await create_group(served.client, served.a, "Everyone")
    for start in range(0, MEMBERS, 10_000):
        added = [
            {"value": str(ids[i]), "display": f"{i:06d}" + "x" * 94}
            for i in range(start, min(start + 10_000, MEMBERS))
        ]
        r = await served.client.patch(
            f"/scim/v2/Groups/{group['id']}",
            headers=headers(served.a),
            json={
                "schemas": [PATCH_OP],
                "Operations": [{"op": "add", "path": "members", "value": added}],
            },
        )
        assert r.status == 204, await r.text()
    return str(group["id"])


async def seed_audit_log(served: Served, entries: int = 12_000) -> None:
    """Tenant A's provisioning log: about 13 MB as JSON lines (rows of the audit view)."""
    await served.pool.execute(
        "INSERT INTO audit_entries (entry_position, transaction_id, id, tenant_id, activity_at,"
        " action, status, target_type, target_id, target_name, method, path, http_status,"
        " duration_ms) SELECT -g, g, gen_random_uuid(), $1, now() - g * interval '1 second',"
        " 'update', 'success', 'User', gen_random_uuid(), repeat('x', 900), 'PATCH',"
        " '/scim/v2/Users/x', 200, 1.0"
        " FROM generate_series(1, $2::int) g",
        served.tenant_a.tenant_id,
        entries,
    )


@asynccontextmanager
async def stalled(served: Served, path: str, header: str) -> AsyncIterator[socket.socket]:
    """A client that sends `path` and never reads (closed on the way out). Entered once the
    server has begun its reply (a peek, which leaves the bytes unread): the request is then
    in flight, past every check made before a reply starts."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect(("127.0.0.1", served.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}\r\n\r\n".encode())

        async def replying() -> bool:
            try:
                return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except BlockingIOError:
                return False

        await eventually(replying, within=60)
        yield sock
    finally:
        sock.close()


def bearer(auth: dict[str, str]) -> str:
    return f"Authorization: {auth['Authorization']}"


def read_all(sock: socket.socket, timeout: float = 60) -> bytes:
    """Everything the server sent until it closed the connection (or reset it)."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


async def status_of(client: Client, path: str, auth: dict[str, str]) -> int:
    r = await client.get(path, headers=auth)
    await r.read()
    return r.status


async def throttled(client: Client, path: str, auth: dict[str, str]) -> dict[str, Any]:
    """`path` is refused with 429 and Retry-After (the token's slots are all held): its body."""
    r = await client.get(path, headers=auth)
    assert r.status == 429, f"{r.status}: {(await r.read())[:200]!r}"
    assert int(r.headers["Retry-After"]) >= 1
    body: dict[str, Any] = await r.json(content_type=None)
    assert body["schemas"] == [ERROR] and body["status"] == "429"
    return body


def pool_idle(pool: asyncpg.Pool) -> bool:
    return bool(pool.get_idle_size() == pool.get_size())


async def until_idle(pool: asyncpg.Pool) -> None:
    """Wait until no connection of the pool is borrowed."""

    async def idle() -> bool:
        return pool_idle(pool)

    await eventually(idle, within=60)


async def until_served(client: Client, path: str, auth: dict[str, str]) -> None:
    """Wait until `path` answers 200 (e.g. the token's slots came free)."""

    async def ok() -> bool:
        return await status_of(client, path, auth) == 200

    await eventually(ok, within=60)


@env(
    SCIMLEDGER_MAX_STREAMS_PER_TOKEN=str(POOL),
    SCIMLEDGER_MAX_CONCURRENT_PER_TOKEN="0",
    SCIMLEDGER_SLOW_CLIENT_TIMEOUT="600",
)
async def test_stalled_group_readers_hold_no_connection(served: Served) -> None:
    group_id = await big_group(served)
    small = (await create_group(served.client, served.a, "Few"))["id"]
    user_a = await create_user(served.client, served.a)
    user_b = await create_user(served.client, served.b)
    async with (
        stalled(served, f"/scim/v2/Groups/{group_id}", bearer(served.a)),
        stalled(served, f"/scim/v2/Groups/{group_id}", bearer(served.a)),
        stalled(served, f"/scim/v2/Groups/{group_id}", bearer(served.a)),
    ):
        # As many stalled streams as the pool has connections. While they wait on their
        # clients they hold none of its connections: the other tenant is served ...
        assert await status_of(served.client, f"/scim/v2/Users/{user_b['id']}", served.b) == 200
        await until_idle(served.pool)
        # ... the token's next stream is 429, and its plain reads are served.
        await throttled(served.client, f"/scim/v2/Groups/{small}", served.a)
        assert await status_of(served.client, "/scim/v2/Users?count=1", served.a) == 200
        # A write is done before its reply streams: that reply is never refused.
        r = await served.client.post(
            "/scim/v2/Groups",
            headers=headers(served.a),
            json={"displayName": "Late", "members": [{"value": user_a["id"]}]},
        )
        assert r.status == 201, await r.text()
        assert [m["value"] for m in (await r.json(content_type=None))["members"]] == [user_a["id"]]
    # The stalled clients are gone: their slots are free again.
    await until_served(served.client, f"/scim/v2/Groups/{small}", served.a)


@env(
    SCIMLEDGER_MAX_STREAMS_PER_TOKEN=str(POOL),
    SCIMLEDGER_MAX_CONCURRENT_PER_TOKEN="0",
    SCIMLEDGER_SLOW_CLIENT_TIMEOUT="600",
)
async def test_stalled_audit_exports_hold_no_connection(served: Served) -> None:
    """The API's export and the web page's export (one writer, two routes)."""
    await seed_audit_log(served)
    async with served.pool.acquire() as conn:
        audit = await issue_token(conn, "tenant-a", "audit", "compliance")
    reader = {"Authorization": f"Bearer {audit.token}"}
    r = await served.client.post(
        "/audit/sign-in", data={"token": audit.token}, allow_redirects=False
    )
    assert r.status == 303, await r.text()
    cookie = f"Cookie: scimledger_audit={r.cookies['scimledger_audit'].value}"
    user_b = await create_user(served.client, served.b)
    async with (
        stalled(served, "/audit/v1/export?format=jsonl", bearer(reader)),
        stalled(served, "/audit/v1/export?format=csv", bearer(reader)),
        stalled(served, "/audit/export?format=jsonl", cookie),
    ):
        assert await status_of(served.client, f"/scim/v2/Users/{user_b['id']}", served.b) == 200
        await until_idle(served.pool)
        body = await throttled(served.client, "/audit/v1/export?format=jsonl", reader)
        assert "streamed replies" in body["detail"]
        assert await status_of(served.client, "/audit/v1/entries?limit=1", reader) == 200
    await until_served(served.client, "/audit/v1/export?to=2000-01-01T00:00:00Z", reader)


@env(
    SCIMLEDGER_MAX_STREAMS_PER_TOKEN="1",
    SCIMLEDGER_MAX_CONCURRENT_PER_TOKEN="0",
    SCIMLEDGER_SLOW_CLIENT_TIMEOUT="2",
)
async def test_a_client_that_does_not_read_is_cut_after_the_timeout(served: Served) -> None:
    group_id = await big_group(served)
    small = (await create_group(served.client, served.a, "Few"))["id"]
    async with stalled(served, f"/scim/v2/Groups/{group_id}", bearer(served.a)) as sock:
        await throttled(served.client, f"/scim/v2/Groups/{small}", served.a)
        # The stream's slot comes free without the client having read a byte: it was cut.
        await until_served(served.client, f"/scim/v2/Groups/{small}", served.a)
        received = await asyncio.to_thread(read_all, sock)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Transfer-Encoding: chunked" in head
    # Cut: well short of the whole reply, and without the last chunk that would end it.
    assert 0 < len(body) < MEMBERS * 100
    assert not body.endswith(b"0\r\n\r\n")


@env(
    SCIMLEDGER_MAX_STREAMS_PER_TOKEN="0",
    SCIMLEDGER_MAX_CONCURRENT_PER_TOKEN="2",
    SCIMLEDGER_SLOW_CLIENT_TIMEOUT="600",
)
async def test_a_token_with_requests_in_flight_at_its_cap_gets_429(served: Served) -> None:
    """Two slow requests of one token (streams to clients that do not read) take its cap; its
    next request is 429 and writes nothing, while the other tenant is served."""
    group_id = await big_group(served)
    user_b = await create_user(served.client, served.b)
    async with (
        stalled(served, f"/scim/v2/Groups/{group_id}", bearer(served.a)),
        stalled(served, f"/scim/v2/Groups/{group_id}", bearer(served.a)),
    ):
        body = await throttled(served.client, "/scim/v2/Users?count=1", served.a)
        assert body["schemas"] == [ERROR] and "requests in flight" in body["detail"]
        before = await served.pool.fetchval("SELECT count(*) FROM stored_events")
        r = await served.client.post(
            "/scim/v2/Users", headers=headers(served.a), json={"userName": "late@contoso.com"}
        )
        assert r.status == 429, await r.text()
        assert await served.pool.fetchval("SELECT count(*) FROM stored_events") == before
        assert await status_of(served.client, f"/scim/v2/Users/{user_b['id']}", served.b) == 200
    await until_served(served.client, "/scim/v2/Users", served.a)


@env(
    SCIMLEDGER_MAX_STREAMS_PER_TOKEN="1",
    SCIMLEDGER_MAX_CONCURRENT_PER_TOKEN="0",
    SCIMLEDGER_SLOW_CLIENT_TIMEOUT="600",
)
async def test_a_group_changed_while_streamed_is_cut_not_mixed(served: Served) -> None:
    """Members are read in pages after the ETag was sent: a change in between cuts the reply."""
    group_id = await big_group(served)
    small = (await create_group(served.client, served.a, "Few"))["id"]
    user = await create_user(served.client, served.a)
    async with stalled(served, f"/scim/v2/Groups/{group_id}", bearer(served.a)) as sock:
        await throttled(served.client, f"/scim/v2/Groups/{small}", served.a)  # sending
        r = await served.client.patch(
            f"/scim/v2/Groups/{group_id}",
            headers=headers(served.a),
            json={
                "schemas": [PATCH_OP],
                "Operations": [{"op": "add", "path": "members", "value": [{"value": user["id"]}]}],
            },
        )
        assert r.status == 204, await r.text()
        received = await asyncio.to_thread(read_all, sock)
    assert not received.endswith(b"0\r\n\r\n")
    # Unchanged, the whole group comes in one piece.
    r = await served.client.get(f"/scim/v2/Groups/{group_id}", headers=served.a)
    assert r.status == 200
    whole = orjson.loads(await r.read())
    assert len(whole["members"]) == MEMBERS + 1
    assert len({m["value"] for m in whole["members"]}) == MEMBERS + 1


@env(
    SCIMLEDGER_MAX_STREAMS_PER_TOKEN="0",
    SCIMLEDGER_MAX_CONCURRENT_PER_TOKEN="2",
    SCIMLEDGER_SLOW_CLIENT_TIMEOUT="600",
)
async def test_the_audit_web_pages_count_against_the_token_cap(served: Served) -> None:
    """The web pages sign in with a session of an audit token: its requests share the token's
    cap with the API's."""
    await seed_audit_log(served)
    async with served.pool.acquire() as conn:
        audit = await issue_token(conn, "tenant-a", "audit", "compliance")
    reader = {"Authorization": f"Bearer {audit.token}"}
    r = await served.client.post(
        "/audit/sign-in", data={"token": audit.token}, allow_redirects=False
    )
    assert r.status == 303, await r.text()
    session = {"Cookie": f"scimledger_audit={r.cookies['scimledger_audit'].value}"}
    async with (
        stalled(served, "/audit/export?format=jsonl", f"Cookie: {session['Cookie']}"),
        stalled(served, "/audit/v1/export?format=jsonl", bearer(reader)),
    ):
        await throttled(served.client, "/audit/v1/entries?limit=1", reader)
        r = await served.client.get("/audit/", headers=session)
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
        assert await status_of(served.client, "/scim/v2/Users", served.b) == 200
    await until_served(served.client, "/audit/v1/entries?limit=1", reader)


@env(
    SCIMLEDGER_MAX_STREAMS_PER_TOKEN="0",
    SCIMLEDGER_MAX_CONCURRENT_PER_TOKEN="0",
    SCIMLEDGER_SLOW_CLIENT_TIMEOUT="600",
)
async def test_a_stream_cut_by_the_database_ends_the_connection(served: Served) -> None:
    """The database fails the query for a next page of a streamed reply (its headers and part
    of its body sent): the connection is closed at once, the reply unfinished, nothing else
    written into it; the client does not wait for a timeout."""
    await seed_audit_log(served)
    group_id = await big_group(served)
    async with served.pool.acquire() as conn:
        audit = await issue_token(conn, "tenant-a", "audit", "compliance")
    reader = {"Authorization": f"Bearer {audit.token}"}
    r = await served.client.post(
        "/audit/sign-in", data={"token": audit.token}, allow_redirects=False
    )
    assert r.status == 303, await r.text()
    cookie = f"Cookie: scimledger_audit={r.cookies['scimledger_audit'].value}"
    for path, auth, table in (
        ("/audit/v1/export?format=jsonl", bearer(reader), "audit_entries"),
        ("/audit/v1/export?format=csv", bearer(reader), "audit_entries"),
        ("/audit/export?format=jsonl", cookie, "audit_entries"),
        (f"/scim/v2/Groups/{group_id}", bearer(served.a), "scim_group_members"),
    ):
        # Connection: close, so that a reply the server ends as whole ends the connection too.
        async with stalled(served, path, f"{auth}\r\nConnection: close") as sock:
            await until_idle(served.pool)  # the reply waits on its client, holding no connection
            await served.pool.execute(f"ALTER TABLE {table} RENAME TO gone")
            try:
                # 20 s: far more than the rest of the reply needs; a hang fails here.
                received = await asyncio.to_thread(read_all, sock, 20)
            finally:
                await served.pool.execute(f"ALTER TABLE gone RENAME TO {table}")
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"HTTP/1.1" not in body  # no second reply written into the first
        assert not body.endswith(b"0\r\n\r\n")  # cut, not ended as if whole
    await until_served(served.client, "/audit/v1/export?format=jsonl", reader)
    await until_served(served.client, f"/scim/v2/Groups/{group_id}", served.a)
