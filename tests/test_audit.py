"""The provisioning log: one entry per write request, read by audit tokens only."""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from infra.database import Database
from infra.tenants import IssuedToken, create_tenant, issue_token
from tests.test_entra_groups import create_group, patch_group
from tests.test_entra_users import create as create_user
from tests.test_entra_users import entra_user, headers, patch
from tests.test_runner import eventually

Client = TestClient[Any, Any]


async def audit_auth(database: Database, tenant: str = "acme") -> dict[str, str]:
    async with database.pool.acquire() as conn:
        token = await issue_token(conn, tenant, "audit", "compliance")
    return {"Authorization": f"Bearer {token.token}"}


async def settled(client: Client, reader: dict[str, str]) -> dict[str, Any]:
    """Wait until the (asynchronous) audit log has caught up, then return the first page."""
    body: dict[str, Any] = {}

    async def caught_up() -> bool:
        nonlocal body
        r = await client.get("/audit/v1/entries?limit=500", headers=reader)
        assert r.status == 200, await r.text()
        body = await r.json()
        return body["lag"]["eventsBehind"] == 0

    await eventually(caught_up)
    return body


async def test_one_entry_per_write_request(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    reader = await audit_auth(database)
    user = await create_user(client, auth, external_id="ext-1")  # 1 create
    await patch(client, auth, user["id"])  # 2 empty Operations: skipped
    await patch(
        client, auth, user["id"], {"op": "Replace", "path": "name.givenName", "value": "Babs"}
    )
    await patch(client, auth, user["id"], {"op": "Replace", "path": "active", "value": "False"})
    r = await client.post(
        "/scim/v2/Users", json=entra_user(), headers={**headers(auth), "X-Request-Id": "dup-1"}
    )
    assert r.status == 409  # 5 failure
    group = await create_group(client, auth)  # 6
    await patch_group(
        client,
        auth,
        group["id"],
        {"op": "add", "path": "members", "value": [{"value": user["id"]}]},
    )
    await client.get(f"/scim/v2/Users/{user['id']}", headers=auth)  # reads are not audited
    r = await client.delete(f"/scim/v2/Users/{user['id']}", headers=auth)  # 8
    assert r.status == 204
    body = await settled(client, reader)
    entries = body["entries"]
    assert len(entries) == 8
    by_action = [
        (e["provisioningAction"], e["provisioningStatusInfo"]["status"]) for e in reversed(entries)
    ]
    assert by_action == [
        ("create", "success"),
        ("other", "skipped"),
        ("update", "success"),
        ("disable", "success"),
        ("create", "failure"),
        ("create", "success"),
        ("update", "success"),
        ("delete", "success"),
    ]
    newest_first = [e["activityDateTime"] for e in entries]
    assert newest_first == sorted(newest_first, reverse=True)
    created = entries[-1]
    assert created["targetIdentity"] == {
        "id": user["id"],
        "displayName": "Test_User@contoso.com",
        "identityType": "User",
    }
    assert created["sourceIdentity"]["id"] == "ext-1"
    assert created["initiatedBy"]["displayName"] == "default"
    assert created["request"] == {"method": "POST", "path": "/scim/v2/Users", "status": 201}
    assert created["durationInMilliseconds"] >= 0
    assert "eventPositions" not in created
    assert [(e["resource"], e["version"], e["type"]) for e in created["events"]] == [
        (f"/Users/{user['id']}", 1, "UserProvisioned"),
        (None, 1, "RequestRecorded"),
    ]
    renamed = entries[-3]
    assert {
        "displayName": "name.givenName",
        "oldValue": "givenName",
        "newValue": "Babs",
    } in renamed["modifiedProperties"]
    disabled = entries[-4]
    assert {"displayName": "active", "oldValue": "true", "newValue": "false"} in disabled[
        "modifiedProperties"
    ]
    failed = entries[-5]
    assert failed["clientRequestId"] == "dup-1" and failed["changeId"] != "dup-1"
    assert failed["provisioningStatusInfo"]["errorInformation"]["errorCode"] == "EntryConflict"
    assert failed["request"]["status"] == 409
    members = entries[-7]
    assert members["targetIdentity"]["id"] == group["id"]
    assert {"displayName": "members added", "oldValue": None, "newValue": user["id"]} in members[
        "modifiedProperties"
    ]
    deleted = entries[-8]
    assert deleted["targetIdentity"]["id"] == user["id"]
    assert any(p["displayName"].endswith("members removed") for p in deleted["modifiedProperties"])
    # One entry by id, with the same content.
    r = await client.get(f"/audit/v1/entries/{failed['id']}", headers=reader)
    assert r.status == 200 and await r.json() == failed


async def test_roles_and_tenants_are_kept_apart(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    reader = await audit_auth(database)
    await create_user(client, auth)
    r = await client.get("/audit/v1/entries", headers=auth)
    assert r.status == 403
    r = await client.get("/scim/v2/Users", headers=reader)
    assert r.status == 403
    r = await client.get("/audit/v1/entries")
    assert r.status == 401
    async with database.pool.acquire() as conn:
        await create_tenant(conn, "fabrikam")
    other = await audit_auth(database, "fabrikam")
    await settled(client, reader)
    r = await client.get("/audit/v1/entries", headers=other)
    assert (await r.json())["entries"] == []
    r = await client.get("/audit/v1/export?format=jsonl", headers=other)
    assert (await r.read()) == b""


async def test_filters_pages_and_exports(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    reader = await audit_auth(database)
    ids = [
        (await create_user(client, auth, user_name=f"person{i}@contoso.com"))["id"]
        for i in range(5)
    ]
    r = await client.post(
        "/scim/v2/Users", json=entra_user("person1@contoso.com"), headers=headers(auth)
    )
    assert r.status == 409
    await settled(client, reader)
    # Keyset pages of 2 walk all 6 entries once, newest first.
    seen: list[str] = []
    next_token = None
    while True:
        query = "limit=2" + (f"&next={next_token}" if next_token else "")
        body = await (await client.get(f"/audit/v1/entries?{query}", headers=reader)).json()
        seen += [e["id"] for e in body["entries"]]
        next_token = body["next"]
        if next_token is None:
            break
    assert len(seen) == len(set(seen)) == 6

    async def ids_for(query: str) -> list[str]:
        r = await client.get(f"/audit/v1/entries?{query}", headers=reader)
        assert r.status == 200, await r.text()
        return [e["targetIdentity"]["id"] for e in (await r.json())["entries"]]

    assert len(await ids_for("status=failure")) == 1
    assert len(await ids_for("action=create&status=success")) == 5
    assert await ids_for("identity=PERSON3") == [ids[3]]
    assert await ids_for(f"target={ids[2]}") == [ids[2]]
    assert len(await ids_for("errorCode=EntryConflict")) == 1
    assert len(await ids_for("from=2000-01-01T00:00:00Z&to=2999-01-01T00:00:00Z")) == 6
    assert await ids_for("to=2000-01-01T00:00:00Z") == []
    for bad in ("status=nope", "from=yesterday", "target=x", "next=%%%"):
        r = await client.get(f"/audit/v1/entries?{bad}", headers=reader)
        assert r.status == 400, bad
    r = await client.get("/audit/v1/export?format=csv&status=success", headers=reader)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(await r.text())))
    assert rows[0][0] == "id" and len(rows) == 1 + 5
    r = await client.get("/audit/v1/export?format=jsonl", headers=reader)
    lines = [orjson.loads(line) for line in (await r.read()).splitlines()]
    assert len(lines) == 6 and all("provisioningAction" in e for e in lines)


async def test_history_and_time_travel(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    reader = await audit_auth(database)
    user = await create_user(client, auth)
    await asyncio.sleep(0.01)
    first = datetime.now(UTC).isoformat()
    await asyncio.sleep(0.01)
    await patch(
        client, auth, user["id"], {"op": "Replace", "path": "displayName", "value": "After"}
    )
    await settled(client, reader)
    r = await client.get(f"/audit/v1/resources/{user['id']}/history", headers=reader)
    history = (await r.json())["entries"]
    assert [e["provisioningAction"] for e in history] == ["create", "update"]
    assert history[1]["modifiedProperties"] == [
        {"displayName": "displayName", "oldValue": None, "newValue": "After"}
    ]
    r = await client.get(f"/audit/v1/resources/{user['id']}", params={"at": first}, headers=reader)
    then = await r.json()
    assert (
        r.status == 200
        and "displayName" not in then
        and then["userName"] == "Test_User@contoso.com"
    )
    r = await client.get(
        f"/audit/v1/resources/{user['id']}",
        params={"at": datetime.now(UTC).isoformat()},
        headers=reader,
    )
    assert (await r.json())["displayName"] == "After"
    r = await client.get(
        f"/audit/v1/resources/{user['id']}", params={"at": "2000-01-01T00:00:00Z"}, headers=reader
    )
    assert r.status == 404
    r = await client.get(f"/audit/v1/resources/{uuid.uuid4()}/history", headers=reader)
    assert (await r.json())["entries"] == []


async def test_reads_are_audited_only_when_the_setting_is_on(
    settings: Any, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    import dataclasses

    from aiohttp.test_utils import TestServer

    from service.app import create_app

    reader = await audit_auth(database)
    for audit_reads, expected in ((False, 0), (True, 2)):
        app = create_app(dataclasses.replace(settings, audit_reads=audit_reads), database)
        async with TestClient(TestServer(app, host="127.0.0.1")) as c:
            before = len((await settled(c, reader))["entries"])
            await c.get("/scim/v2/Users", headers=auth)
            await c.post("/scim/v2/Users/.search", json={"filter": 'userName eq "x"'}, headers=auth)
            entries = (await settled(c, reader))["entries"]
            assert len(entries) - before == expected
            if expected:
                assert {e["provisioningAction"] for e in entries[:2]} == {"other"}
                assert {e["request"]["method"] for e in entries[:2]} == {"GET", "POST"}
