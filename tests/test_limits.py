"""Limits: body size, filter length and nesting, count, PATCH operations and members, and the
per-token rate limit. Each answers a SCIM Error with the right status and writes nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from infra.config import Settings
from infra.database import Database
from infra.tenants import IssuedToken, issue_token
from service.app import create_app
from service.middlewares import TokenBuckets
from tests.test_entra_groups import PATCH_OP, create_group, members
from tests.test_entra_users import create, entra_user, event_count, get_user, headers

Client = TestClient[Any, Any]
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
SCIM = "application/scim+json"
MiB = 1024 * 1024

MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
async def make_client(settings: Settings, database: Database) -> AsyncIterator[MakeClient]:
    """A server with some settings changed (no projection runners: nothing here needs them)."""
    async with AsyncExitStack() as stack:

        async def make(**changes: Any) -> Client:
            app = create_app(replace(settings, run_projections=False, **changes), database)
            return await stack.enter_async_context(TestClient(TestServer(app, host="127.0.0.1")))

        yield make


async def scim_error(response: Any, status: int, scim_type: str | None = None) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.headers["Content-Type"].startswith(SCIM)
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["schemas"] == [ERROR] and body["status"] == str(status)
    assert body.get("scimType") == scim_type
    return body


async def audit_records(database: Database) -> int:
    return int(
        await database.pool.fetchval(
            "SELECT count(*) FROM stored_events WHERE topic LIKE 'domain.request:%'"
        )
    )


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert defaults.max_body_bytes == 2 * MiB
    assert defaults.max_patch_operations == 1000 and defaults.max_patch_members == 10000
    assert defaults.rate_limit == 100 and defaults.rate_limit_burst == 200  # Entra: ~25/s
    for name, value in (
        ("SCIMLEDGER_MAX_BODY_BYTES", "1000"),
        ("SCIMLEDGER_MAX_PATCH_OPERATIONS", "7"),
        ("SCIMLEDGER_MAX_PATCH_MEMBERS", "8"),
        ("SCIMLEDGER_RATE_LIMIT", "2.5"),
        ("SCIMLEDGER_RATE_LIMIT_BURST", "9"),
        ("SCIMLEDGER_DB_CONNECT_TIMEOUT", "3"),
        ("SCIMLEDGER_DB_COMMAND_TIMEOUT", "4"),
    ):
        monkeypatch.setenv(name, value)
    configured = Settings()
    assert configured.max_body_bytes == 1000
    assert (configured.max_patch_operations, configured.max_patch_members) == (7, 8)
    assert (configured.rate_limit, configured.rate_limit_burst) == (2.5, 9)
    assert (configured.db_connect_timeout, configured.db_command_timeout) == (3.0, 4.0)


async def test_body_limit_is_a_scim_413_and_writes_nothing(
    client: Client, make_client: MakeClient, auth: dict[str, str], database: Database
) -> None:
    r = await client.get("/scim/v2/ServiceProviderConfig", headers=auth)
    spc = await r.json(content_type=None)
    assert spc["bulk"] == {"supported": False, "maxOperations": 0, "maxPayloadSize": 2 * MiB}

    # The default: 2 MiB. Just over it, with a Content-Length and chunked.
    user = entra_user("big@contoso.com")
    user["displayName"] = "x" * (2 * MiB)
    body = await scim_error(
        await client.post("/scim/v2/Users", json=user, headers=headers(auth)), 413
    )
    assert body["detail"] == f"The request body is larger than {2 * MiB} bytes"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b" " * MiB

    await scim_error(await client.post("/scim/v2/Users", data=chunks(), headers=headers(auth)), 413)
    assert await event_count(database) == 0

    small = await make_client(max_body_bytes=4096)
    r = await small.get("/scim/v2/ServiceProviderConfig", headers=auth)
    assert (await r.json(content_type=None))["bulk"]["maxPayloadSize"] == 4096
    user["displayName"] = "x" * 5000
    for method, path in (("POST", "/scim/v2/Users"), ("POST", "/scim/v2/Users/.search")):
        r = await small.request(method, path, json=user, headers=headers(auth))
        await scim_error(r, 413)
    created = await create(small, auth, user_name="small@contoso.com")
    patch = {
        "schemas": [PATCH_OP],
        "Operations": [{"op": "replace", "path": "displayName", "value": "y" * 5000}],
    }
    r = await small.patch(f"/scim/v2/Users/{created['id']}", json=patch, headers=headers(auth))
    await scim_error(r, 413)
    assert await event_count(database) == 1  # the one user created; nothing else
    assert (await get_user(small, auth, created["id"])).get("displayName") is None


async def test_filter_length_and_nesting_and_count(
    client: Client, make_client: MakeClient, auth: dict[str, str]
) -> None:
    too_long = 'userName eq "' + "a" * 4096 + '"'
    too_deep = "(" * 33 + "userName pr" + ")" * 33
    deep_enough = "(" * 32 + "userName pr" + ")" * 32
    for resource in ("Users", "Groups"):
        attribute = "userName" if resource == "Users" else "displayName"
        for expression in (too_long, too_deep):
            expression = expression.replace("userName", attribute)
            r = await client.get(
                f"/scim/v2/{resource}", params={"filter": expression}, headers=auth
            )
            await scim_error(r, 400, "invalidFilter")
            r = await client.post(
                f"/scim/v2/{resource}/.search", json={"filter": expression}, headers=headers(auth)
            )
            await scim_error(r, 400, "invalidFilter")
        ok = deep_enough.replace("userName", attribute)
        r = await client.get(f"/scim/v2/{resource}", params={"filter": ok}, headers=auth)
        assert r.status == 200, await r.text()

    capped = await make_client(max_results=3)
    for i in range(5):
        await create(capped, auth, user_name=f"u{i}@contoso.com")
    r = await capped.get("/scim/v2/ServiceProviderConfig", headers=auth)
    assert (await r.json(content_type=None))["filter"] == {"supported": True, "maxResults": 3}
    for query in ("count=100", "", "startIndex=2&count=1000"):
        r = await capped.get(f"/scim/v2/Users?{query}", headers=auth)
        page = await r.json(content_type=None)
        assert page["totalResults"] == 5 and page["itemsPerPage"] == len(page["Resources"]) == 3
    r = await capped.post("/scim/v2/Users/.search", json={"count": 50}, headers=headers(auth))
    assert len((await r.json(content_type=None))["Resources"]) == 3


async def test_patch_operation_and_member_limits_write_nothing(
    client: Client, make_client: MakeClient, auth: dict[str, str], database: Database
) -> None:
    def op(path: str | None, value: Any, kind: str = "add") -> dict[str, Any]:
        return {"op": kind, "value": value} | ({"path": path} if path else {})

    def body(*ops: dict[str, Any]) -> dict[str, Any]:
        return {"schemas": [PATCH_OP], "Operations": list(ops)}

    # The defaults: 1000 operations per PATCH.
    user = await create(client, auth, user_name="limits@contoso.com")
    r = await client.patch(
        f"/scim/v2/Users/{user['id']}",
        json=body(*[op("displayName", f"n{i}", "replace") for i in range(1001)]),
        headers=headers(auth),
    )
    detail = (await scim_error(r, 400, "invalidValue"))["detail"]
    assert "at most 1000 operations" in detail

    limited = await make_client(max_patch_operations=3, max_patch_members=2)
    before = await event_count(database)
    r = await limited.patch(
        f"/scim/v2/Users/{user['id']}",
        json=body(*[op("displayName", f"n{i}", "replace") for i in range(4)]),
        headers=headers(auth),
    )
    await scim_error(r, 400, "invalidValue")
    assert await event_count(database) == before
    assert (await get_user(client, auth, user["id"])).get("displayName") is None
    r = await limited.patch(
        f"/scim/v2/Users/{user['id']}",
        json=body(*[op("displayName", f"n{i}", "replace") for i in range(3)]),
        headers=headers(auth),
    )
    assert r.status == 200, await r.text()

    group = await create_group(client, auth)
    path = f"/scim/v2/Groups/{group['id']}"
    others = [(await create(client, auth, user_name=f"m{i}@contoso.com"))["id"] for i in range(2)]
    three = [*others, user["id"]]
    before = await event_count(database)
    refused = [
        body(op("members", [{"value": m} for m in three])),
        body(op("members", [{"value": m} for m in three], "replace")),
        body(op(None, {"members": [{"value": m} for m in three]})),
        body(op(None, {"members": [{"value": m} for m in three]}, "replace")),
        body(*[op("members", [{"value": m}]) for m in [*three, user["id"]]]),  # 4 operations
        body(op("members[" + " or ".join(f'value eq "{m}"' for m in three) + "]", None, "remove")),
    ]
    for request in refused:
        r = await limited.patch(path, json=request, headers=headers(auth))
        await scim_error(r, 400, "invalidValue")
    assert await event_count(database) == before
    assert await members(client, auth, group["id"]) == []

    r = await limited.patch(
        path, json=body(op("members", [{"value": m} for m in others])), headers=headers(auth)
    )
    assert r.status == 204, await r.text()
    assert await members(client, auth, group["id"]) == sorted(others)


def test_token_bucket_refills_at_its_rate() -> None:
    buckets = TokenBuckets(rate=2.0, burst=3)
    key = uuid.uuid4()
    assert [buckets.take(key, now=10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take(key, now=10.0) == pytest.approx(0.5)
    assert buckets.take(key, now=10.5) == 0.0  # one token back after 1/rate seconds
    assert buckets.take(key, now=10.5) == pytest.approx(0.5)
    assert buckets.take(uuid.uuid4(), now=10.5) == 0.0  # every token has its own bucket
    assert [buckets.take(key, now=100.0) for _ in range(4)][-1] > 0  # never above the burst


async def test_rate_limit_is_a_scim_429_with_retry_after(
    make_client: MakeClient, auth: dict[str, str], tenant: IssuedToken, database: Database
) -> None:
    # One request per 1000 s after a burst of 3: no refill can happen during the test.
    limited = await make_client(rate_limit=0.001, rate_limit_burst=3)
    for _ in range(3):
        r = await limited.get("/scim/v2/ServiceProviderConfig", headers=auth)
        assert r.status == 200
    records = await audit_records(database)
    r = await limited.post("/scim/v2/Users", json=entra_user(), headers=headers(auth))
    body = await scim_error(r, 429)
    assert "Too many requests" in body["detail"]
    assert 1 <= int(r.headers["Retry-After"]) <= 1000
    r = await limited.get("/scim/v2/Users", headers=auth)
    await scim_error(r, 429)
    # Nothing written, not even an audit record: the limit spares the database.
    assert await event_count(database) == 0
    assert await audit_records(database) == records

    # The limit is per token: another token of the same tenant (an audit one, too) still goes.
    async with database.pool.acquire() as conn:
        fresh = await issue_token(conn, "acme", "provisioning", "fresh")
        reader = await issue_token(conn, "acme", "audit", "reader")
    r = await limited.post(
        "/scim/v2/Users",
        json=entra_user(),
        headers=headers({"Authorization": f"Bearer {fresh.token}"}),
    )
    assert r.status == 201, await r.text()
    r = await limited.get("/audit/v1/entries", headers={"Authorization": f"Bearer {reader.token}"})
    assert r.status == 200
    # Probes spend nothing.
    for _ in range(5):
        assert (await limited.get("/healthz")).status == 200

    # Off with 0.
    unlimited = await make_client(rate_limit=0)
    for _ in range(10):
        assert (await unlimited.get("/scim/v2/ServiceProviderConfig", headers=auth)).status == 200
