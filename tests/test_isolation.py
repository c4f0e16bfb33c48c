"""Two tenants with the same userNames and group names try every endpoint across each other.

Another tenant's id is a 404 (never 403, never its data); lists, filters, .search, cursors,
members and the manager never reach across; nothing is written by a refused request; the
provisioning log (entries, one entry, history, time travel, exports) stays within its tenant.
"""

from __future__ import annotations

import csv
import io
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp.test_utils import TestClient

from infra.database import Database
from infra.tenants import IssuedToken, create_tenant, issue_token
from tests.test_entra_groups import AD_GROUP, GROUP, PATCH_OP
from tests.test_entra_users import ENTERPRISE, entra_user, event_count, headers
from tests.test_runner import eventually

Client = TestClient[Any, Any]
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
NAMES = ("alice@example.com", "bob@example.com")
GROUP_NAME = "Engineering"
SHARED_EXTERNAL_ID = "same-external-id"


@dataclass
class Tenant:
    name: str
    tenant_id: uuid.UUID
    auth: dict[str, str]
    reader: dict[str, str]
    alice: str = ""
    bob: str = ""
    group: str = ""

    @property
    def marker(self) -> str:
        """A value only this tenant's data carries."""
        return f"Department of {self.name}"


async def setup_tenant(client: Client, database: Database, issued: IssuedToken) -> Tenant:
    async with database.pool.acquire() as conn:
        reader = await issue_token(conn, issued.tenant, "audit", "compliance")
    t = Tenant(
        issued.tenant,
        issued.tenant_id,
        {"Authorization": f"Bearer {issued.token}"},
        {"Authorization": f"Bearer {reader.token}"},
    )
    ids = []
    for user_name in NAMES:
        user = entra_user(user_name, SHARED_EXTERNAL_ID if user_name == NAMES[0] else None)
        user[ENTERPRISE] = {"department": t.marker}
        r = await client.post("/scim/v2/Users", json=user, headers=headers(t.auth))
        assert r.status == 201, await r.text()
        ids.append((await r.json(content_type=None))["id"])
    t.alice, t.bob = ids
    r = await client.patch(
        f"/scim/v2/Users/{t.alice}",
        json={
            "schemas": [PATCH_OP],
            "Operations": [{"op": "add", "path": f"{ENTERPRISE}:manager", "value": t.bob}],
        },
        headers=headers(t.auth),
    )
    assert r.status == 200, await r.text()
    r = await client.post(
        "/scim/v2/Groups",
        json={
            "schemas": [GROUP, AD_GROUP],
            "displayName": GROUP_NAME,
            "externalId": SHARED_EXTERNAL_ID,
            "members": [{"value": t.alice}],
        },
        headers=headers(t.auth),
    )
    assert r.status == 201, await r.text()
    t.group = (await r.json(content_type=None))["id"]
    return t


async def not_found(r: Any, other: Tenant) -> None:
    """404 with a SCIM Error that carries nothing of the other tenant."""
    text = await r.text()
    assert r.status == 404, text
    body = orjson.loads(text)
    assert body["schemas"] == [ERROR] and body["status"] == "404"
    assert set(body) <= {"schemas", "status", "detail"}
    assert other.marker not in text and "@example.com" not in text


async def refused(r: Any, scim_type: str = "invalidValue") -> None:
    text = await r.text()
    assert r.status == 400, text
    body = orjson.loads(text)
    assert body["schemas"] == [ERROR] and body["scimType"] == scim_type


async def scim_list(client: Client, auth: dict[str, str], path: str, **params: str) -> list[Any]:
    query = "&".join(f"{k}={quote(v)}" for k, v in params.items())
    r = await client.get(f"{path}?{query}", headers=auth)
    assert r.status == 200, await r.text()
    return list((await r.json(content_type=None))["Resources"])


async def search(client: Client, auth: dict[str, str], path: str, body: Any) -> list[Any]:
    r = await client.post(f"{path}/.search", json=body, headers=headers(auth))
    assert r.status == 200, await r.text()
    return list((await r.json(content_type=None))["Resources"])


async def snapshot(client: Client, t: Tenant) -> Any:
    """Everything a tenant has, as its own token reads it (with versions)."""
    users = await scim_list(client, t.auth, "/scim/v2/Users", sortBy="userName")
    groups = await scim_list(client, t.auth, "/scim/v2/Groups")
    return users, groups


async def try_across(client: Client, me: Tenant, other: Tenant) -> None:
    auth, h = me.auth, headers(me.auth)
    patch_name = {
        "schemas": [PATCH_OP],
        "Operations": [{"op": "replace", "path": "displayName", "value": "taken over"}],
    }
    # By id: every verb, with and without preconditions.
    for kind, resource_id in (
        ("Users", other.alice),
        ("Users", other.bob),
        ("Groups", other.group),
    ):
        path = f"/scim/v2/{kind}/{resource_id}"
        await not_found(await client.get(path, headers=auth), other)
        await not_found(await client.get(path, headers={**auth, "If-None-Match": 'W/"1"'}), other)
        replacement = (
            entra_user(NAMES[0])
            if kind == "Users"
            else {"schemas": [GROUP], "displayName": GROUP_NAME, "members": []}
        )
        await not_found(await client.put(path, json=replacement, headers=h), other)
        await not_found(await client.patch(path, json=patch_name, headers=h), other)
        await not_found(
            await client.patch(path, json=patch_name, headers={**h, "If-Match": 'W/"2"'}), other
        )
        await not_found(await client.delete(path, headers={**auth, "If-Match": "*"}), other)
        await not_found(await client.delete(path, headers=auth), other)

    # Lists, filters, .search and cursors: only mine, even for the other tenant's ids.
    mine_users = {me.alice, me.bob}
    assert {u["id"] for u in await scim_list(client, auth, "/scim/v2/Users")} == mine_users
    for expression, expected in (
        (f'userName eq "{NAMES[0]}"', {me.alice}),
        (f'externalId eq "{SHARED_EXTERNAL_ID}"', {me.alice}),
        (f'emails[type eq "work"].value eq "{NAMES[1]}"', {me.bob}),
        (f'id eq "{other.alice}" or id eq "{other.bob}"', set()),
        (f'{ENTERPRISE}:manager.value eq "{other.bob}"', set()),
        (f'{ENTERPRISE}:department eq "{other.marker}"', set()),
        ('userName sw "a"', {me.alice}),
    ):
        found = await scim_list(client, auth, "/scim/v2/Users", filter=expression)
        assert {u["id"] for u in found} == expected, expression
        found = await search(client, auth, "/scim/v2/Users", {"filter": expression})
        assert {u["id"] for u in found} == expected, expression
    walked, cursor = set(), ""
    while True:
        r = await client.get(f"/scim/v2/Users?count=1&cursor={cursor}", headers=auth)
        body = await r.json(content_type=None)
        walked |= {u["id"] for u in body["Resources"]}
        if "nextCursor" not in body:
            break
        cursor = body["nextCursor"]
    assert walked == mine_users
    r = await client.get(
        "/scim/v2/Users?count=1&cursor=", headers=other.auth
    )  # the other tenant's cursor, used by me
    foreign = (await r.json(content_type=None))["nextCursor"]
    r = await client.get(f"/scim/v2/Users?count=10&cursor={foreign}", headers=auth)
    assert {u["id"] for u in (await r.json(content_type=None))["Resources"]} <= mine_users

    for expression, expected in (
        (f'displayName eq "{GROUP_NAME}"', {me.group}),
        (f'externalId eq "{SHARED_EXTERNAL_ID}"', {me.group}),
        (f'members.value eq "{other.alice}"', set()),
        (f'id eq "{other.group}"', set()),
        (f'members.value eq "{me.alice}"', {me.group}),
    ):
        found = await scim_list(client, auth, "/scim/v2/Groups", filter=expression)
        assert {g["id"] for g in found} == expected, expression
        found = await search(client, auth, "/scim/v2/Groups", {"filter": expression})
        assert {g["id"] for g in found} == expected, expression
    (group,) = await scim_list(client, auth, "/scim/v2/Groups")
    assert [m["value"] for m in group["members"]] == [me.alice]
    r = await client.get(f"/scim/v2/Users/{me.alice}", headers=auth)
    alice = await r.json(content_type=None)
    assert [g["value"] for g in alice["groups"]] == [me.group]
    assert alice[ENTERPRISE]["manager"]["value"] == me.bob
    assert alice[ENTERPRISE]["department"] == me.marker

    # References to the other tenant's resources: 400 invalidValue, nothing applied.
    group_path = f"/scim/v2/Groups/{me.group}"
    for foreign_member in (other.bob, other.group):
        ops = [{"op": "add", "path": "members", "value": [{"value": foreign_member}]}]
        r = await client.patch(
            group_path, json={"schemas": [PATCH_OP], "Operations": ops}, headers=h
        )
        await refused(r)
        ops = [{"op": "add", "value": {"members": [{"value": me.bob}, {"value": foreign_member}]}}]
        r = await client.patch(
            group_path, json={"schemas": [PATCH_OP], "Operations": ops}, headers=h
        )
        await refused(r)
    members = [{"value": me.bob}, {"value": other.bob}]
    put = {"schemas": [GROUP], "displayName": GROUP_NAME, "members": members}
    await refused(await client.put(group_path, json=put, headers=h))
    new_group = {"schemas": [GROUP], "displayName": "Cross", "members": [{"value": other.alice}]}
    await refused(await client.post("/scim/v2/Groups", json=new_group, headers=h))
    manager_ops = [{"op": "replace", "path": f"{ENTERPRISE}:manager", "value": other.alice}]
    r = await client.patch(
        f"/scim/v2/Users/{me.bob}",
        json={"schemas": [PATCH_OP], "Operations": manager_ops},
        headers=h,
    )
    await refused(r)
    managed = entra_user("carol@example.com")
    managed[ENTERPRISE] = {"manager": {"value": other.alice}}
    await refused(await client.post("/scim/v2/Users", json=managed, headers=h))
    # Removing a member that is the other tenant's user changes nothing anywhere.
    remove = [{"op": "remove", "path": "members", "value": [{"value": other.alice}]}]
    r = await client.patch(
        group_path, json={"schemas": [PATCH_OP], "Operations": remove}, headers=h
    )
    assert r.status == 204, await r.text()


async def audit_across(client: Client, me: Tenant, other: Tenant, theirs: list[Any]) -> None:
    """The provisioning log of `me` holds only its own entries, whatever it asks for."""
    reader = me.reader
    r = await client.get("/audit/v1/entries?limit=500", headers=reader)
    mine = (await r.json(content_type=None))["entries"]
    assert mine and {e["tenantId"] for e in mine} == {str(me.tenant_id)}
    their_ids = {e["id"] for e in theirs}
    assert not their_ids & {e["id"] for e in mine}
    assert other.marker not in orjson.dumps(mine).decode()
    for entry in theirs[:5]:
        r = await client.get(f"/audit/v1/entries/{entry['id']}", headers=reader)
        await not_found(r, other)
        r = await client.get(f"/audit/v1/entries?changeId={entry['changeId']}", headers=reader)
        assert (await r.json(content_type=None))["entries"] == []
    for resource_id in (other.alice, other.bob, other.group):
        # My own refused requests against that id are my entries; none of theirs shows.
        r = await client.get(f"/audit/v1/resources/{resource_id}/history", headers=reader)
        assert r.status == 200
        history = (await r.json(content_type=None))["entries"]
        assert {e["tenantId"] for e in history} <= {str(me.tenant_id)}
        assert all(e["provisioningStatusInfo"]["status"] == "failure" for e in history)
        assert not their_ids & {e["id"] for e in history}
        r = await client.get(
            f"/audit/v1/resources/{resource_id}?at=2999-01-01T00:00:00Z", headers=reader
        )
        await not_found(r, other)
    for fmt in ("jsonl", "csv"):
        r = await client.get(f"/audit/v1/export?format={fmt}", headers=reader)
        assert r.status == 200
        text = await r.text()
        assert other.marker not in text and not any(i in text for i in their_ids)
        if fmt == "jsonl":
            exported = [orjson.loads(line) for line in text.splitlines()]
            assert {e["tenantId"] for e in exported} == {str(me.tenant_id)}
            assert len(exported) == len(mine)
        else:
            assert len(list(csv.reader(io.StringIO(text)))) == len(mine) + 1
    # The other tenant's audit token cannot use my SCIM endpoints, nor mine its log.
    r = await client.get(f"/scim/v2/Users/{me.alice}", headers=other.reader)
    assert r.status == 403


async def settle(client: Client, t: Tenant) -> list[Any]:
    entries: list[Any] = []

    async def caught_up() -> bool:
        nonlocal entries
        r = await client.get("/audit/v1/entries?limit=500", headers=t.reader)
        body = await r.json(content_type=None)
        entries = body["entries"]
        return bool(body["lag"]["eventsBehind"] == 0)

    await eventually(caught_up)
    return entries


async def test_two_tenants_with_the_same_names_never_cross(
    client: Client, database: Database, tenant: IssuedToken
) -> None:
    async with database.pool.acquire() as conn:
        second = await create_tenant(conn, "globex")
    acme = await setup_tenant(client, database, tenant)
    globex = await setup_tenant(client, database, second)
    before = {t.name: await snapshot(client, t) for t in (acme, globex)}
    events = await event_count(database)

    await try_across(client, acme, globex)
    await try_across(client, globex, acme)

    # Nothing any refused request asked for was written, on either side.
    assert await event_count(database) == events
    assert {t.name: await snapshot(client, t) for t in (acme, globex)} == before

    logs = {t.name: await settle(client, t) for t in (acme, globex)}
    await audit_across(client, acme, globex, logs["globex"])
    await audit_across(client, globex, acme, logs["acme"])
