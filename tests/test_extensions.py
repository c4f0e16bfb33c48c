"""Custom schema extensions (issue 15): what Entra sends under an admin's own URN is kept.

Entra's exact shapes: a POST body with `"urn:…:CustomExtensionName:2.0:User":
{"CustomAttribute": "blue"}` (often without the URN in `schemas`), PATCH by the full URN path,
no-path values keyed by URN, and `filter=urn:…:CustomAttribute eq "blue"`.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from infra.database import Database
from infra.schemas import BadDeclaration, declare, parse_declaration, withdraw
from infra.tenants import IssuedToken, create_tenant, set_tenant_undeclared
from projections.registry import PROJECTIONS
from service.scim.filter import SqlParams, user_filter_sql
from service.scim.lists import tenant_where
from service.scim.users import USERS_VIEW
from tests.test_audit import audit_auth, settled
from tests.test_cli import run
from tests.test_entra_groups import GROUP
from tests.test_entra_users import (
    PATCH_OP,
    entra_user,
    event_count,
    find,
    get_user,
    headers,
    patch,
)
from tests.test_projections import rebuild_all, settle, snapshot

Client = TestClient[Any, Any]
CUSTOM = "urn:ietf:params:scim:schemas:extension:CustomExtensionName:2.0:User"
ATTRIBUTE = f"{CUSTOM}:CustomAttribute"


def custom_user(user_name: str = "Test_User@contoso.com", **extension: Any) -> dict[str, Any]:
    body = entra_user(user_name)  # its schemas do not list CUSTOM, as Entra's often do not
    body[CUSTOM] = extension or {"CustomAttribute": "blue"}
    return body


async def post_user(client: Client, auth: dict[str, str], body: dict[str, Any]) -> Any:
    r = await client.post("/scim/v2/Users", json=body, headers=headers(auth))
    assert r.status == 201, await r.text()
    return await r.json(content_type=None)


async def domain_events(database: Database, user_id: str) -> list[tuple[str, dict[str, Any]]]:
    # Decoded by the store: personal values are sealed in the stored state (infra.keys).
    store = database.store
    records = await store.read_stream(database.pool, uuid.UUID(user_id))
    return [(r.topic.rpartition(".")[2], dict(vars(store.to_domain(r)))) for r in records]


async def test_entra_custom_attribute_round_trips(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    sent = custom_user()
    created = await post_user(client, auth, sent)
    assert created[CUSTOM] == {"CustomAttribute": "blue"}
    assert CUSTOM in created["schemas"]
    user_id = created["id"]
    assert (await get_user(client, auth, user_id))[CUSTOM] == {"CustomAttribute": "blue"}
    (provisioned,) = await domain_events(database, user_id)
    assert provisioned[1]["attributes"][CUSTOM] == {"CustomAttribute": "blue"}

    # Found by a filter on the full name, in any case, and by the attributes it selects.
    for query in (
        f'filter={ATTRIBUTE} eq "blue"',
        f'filter={ATTRIBUTE.upper()} eq "BLUE"',
        f'filter={ATTRIBUTE} sw "bl" and userName eq "test_user@contoso.com"',
        f"filter={ATTRIBUTE} pr",
    ):
        found = await find(client, auth, query)
        assert [u["id"] for u in found["Resources"]] == [user_id], query
    for query in (f'filter={ATTRIBUTE} eq "red"', f'filter={ATTRIBUTE} ne "blue"'):
        assert (await find(client, auth, query))["Resources"] == [], query
    assert (await find(client, auth, f'filter=not ({ATTRIBUTE} eq "red")'))["totalResults"] == 1
    selected = await find(client, auth, f"attributes={ATTRIBUTE}")
    assert selected["Resources"][0][CUSTOM] == {"CustomAttribute": "blue"}
    assert "userName" not in selected["Resources"][0]
    excluded = await find(client, auth, f"excludedAttributes={CUSTOM}")
    assert CUSTOM not in excluded["Resources"][0]

    # Default PATCH style: capitalised ops, the full URN path.
    before = await event_count(database)
    patched = await patch(
        client, auth, user_id, {"op": "Replace", "path": ATTRIBUTE, "value": "green"}
    )
    assert patched[CUSTOM] == {"CustomAttribute": "green"}
    *_, (name, changed) = await domain_events(database, user_id)
    assert name == "UserAttributesChanged" and changed["changed"] == {ATTRIBUTE: "green"}
    assert await event_count(database) == before + 1
    # An unchanged resync appends nothing.
    await patch(client, auth, user_id, {"op": "Replace", "path": ATTRIBUTE, "value": "green"})
    r = await client.put(
        f"/scim/v2/Users/{user_id}",
        json={**sent, CUSTOM: {"customattribute": "green"}},
        headers=headers(auth),
    )
    assert r.status == 200
    assert await event_count(database) == before + 1

    # aadOptscim062020 style: several URN keys in one no-path value.
    patched = await patch(
        client,
        auth,
        user_id,
        {"op": "add", "value": {ATTRIBUTE: "teal", f"{CUSTOM}:HireDate": "2026-01-05"}},
    )
    assert patched[CUSTOM] == {"CustomAttribute": "teal", "HireDate": "2026-01-05"}
    patched = await patch(client, auth, user_id, {"op": "Remove", "path": f"{CUSTOM}:hiredate"})
    assert patched[CUSTOM] == {"CustomAttribute": "teal"}
    # The whole extension object, as a no-path value keyed by the URN.
    patched = await patch(
        client, auth, user_id, {"op": "replace", "value": {CUSTOM: {"Badges": ["a", "b"]}}}
    )
    assert patched[CUSTOM] == {"Badges": ["a", "b"], "CustomAttribute": "teal"}
    patched = await patch(
        client, auth, user_id, {"op": "Add", "path": f"{CUSTOM}:Badges", "value": ["c", "a"]}
    )
    assert patched[CUSTOM]["Badges"] == ["a", "b", "c"]
    patched = await patch(
        client, auth, user_id, {"op": "Remove", "path": f"{CUSTOM}:Badges", "value": ["b"]}
    )
    assert patched[CUSTOM]["Badges"] == ["a", "c"]
    found = await find(client, auth, f'filter={CUSTOM}:Badges eq "c"')
    assert found["totalResults"] == 1
    patched = await patch(client, auth, user_id, {"op": "Remove", "path": ATTRIBUTE})
    assert patched[CUSTOM] == {"Badges": ["a", "c"]}
    patched = await patch(client, auth, user_id, {"op": "Remove", "path": f"{CUSTOM}:Badges"})
    assert CUSTOM not in patched and CUSTOM not in patched["schemas"]
    assert CUSTOM not in await get_user(client, auth, user_id)


async def test_typed_values_compare_as_their_type(client: Client, auth: dict[str, str]) -> None:
    ext = "urn:example:ext:2.0:User"
    body = entra_user("typed@contoso.com")
    body[ext] = {"level": 7, "remote": True, "badge": {"value": "B-1", "site": "Oslo"}}
    user_id = (await post_user(client, auth, body))["id"]
    for query in (
        f"filter={ext}:level eq 7",
        f"filter={ext}:level gt 6.5",
        f"filter={ext}:remote eq true",
        f'filter={ext}:badge eq "b-1"',
        f'filter={ext}:badge.site eq "oslo"',
    ):
        assert [u["id"] for u in (await find(client, auth, query))["Resources"]] == [user_id]
    for query in (f"filter={ext}:level lt 7", f"filter={ext}:remote eq false"):
        assert (await find(client, auth, query))["totalResults"] == 0, query
    r = await client.get(f'/scim/v2/Users?filter={ext}:badge[site eq "x"]', headers=auth)
    assert r.status == 400 and (await r.json())["scimType"] == "invalidFilter"


async def test_limits_apply_to_extension_values(
    client: Client, auth: dict[str, str], database: Database, settings: Any
) -> None:
    before = await event_count(database)
    too_many = custom_user(Badges=[str(i) for i in range(settings.max_multi_values + 1)])
    r = await client.post("/scim/v2/Users", json=too_many, headers=headers(auth))
    assert r.status == 400 and (await r.json())["scimType"] == "invalidValue"
    assert "Badges" in (await r.json())["detail"]
    too_long = custom_user(Note="x" * (settings.max_string_length + 1))
    r = await client.post("/scim/v2/Users", json=too_long, headers=headers(auth))
    assert r.status == 400 and (await r.json())["scimType"] == "invalidValue"
    deep: Any = "x"
    for _ in range(40):
        deep = {"a": deep}
    r = await client.post("/scim/v2/Users", json=custom_user(Deep=deep), headers=headers(auth))
    assert r.status == 400 and (await r.json())["scimType"] == "invalidValue"
    bad_name = custom_user(**{"not a name": "x"})
    r = await client.post("/scim/v2/Users", json=bad_name, headers=headers(auth))
    assert r.status == 400 and (await r.json())["scimType"] == "invalidValue"
    user_id = (await post_user(client, auth, custom_user(Badges=["a"])))["id"]
    grown = [str(i) for i in range(settings.max_multi_values)]
    await patch(
        client,
        auth,
        user_id,
        {"op": "add", "path": f"{CUSTOM}:Badges", "value": grown},
        status=400,
    )
    assert await event_count(database) == before + 1  # the one user created


async def test_reject_undeclared_writes_nothing(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken, fresh_dsn: str
) -> None:
    kept = (await post_user(client, auth, custom_user("kept@contoso.com")))["id"]
    code, out, err = await run(
        "tenants", "set", "acme", "--undeclared", "reject", "--database-url", fresh_dsn
    )
    assert code == 0, err
    assert out.strip() == "tenant acme now rejects undeclared extension attributes"
    code, out, _ = await run("tenants", "list", "--json", "--database-url", fresh_dsn)
    assert orjson.loads(out)["undeclared"] == "reject"
    code, _, err = await run(
        "tenants", "set", "acme", "--undeclared", "drop", "--database-url", fresh_dsn
    )
    assert code == 2 and "drop" in err
    async with database.pool.acquire() as conn:
        assert not await set_tenant_undeclared(conn, "acme", "reject")
    before = await event_count(database)
    users = await database.pool.fetchval("SELECT count(*) FROM scim_users")
    r = await client.post("/scim/v2/Users", json=custom_user(), headers=headers(auth))
    assert r.status == 400, await r.text()
    error = await r.json()
    assert error["scimType"] == "invalidValue" and CUSTOM in error["detail"]
    assert "--undeclared keep" in error["detail"]
    for operation in (
        {"op": "Add", "path": ATTRIBUTE, "value": "red"},
        {"op": "add", "value": {ATTRIBUTE: "red"}},
    ):
        body = await patch(client, auth, kept, operation, status=400)
        assert CUSTOM in body["detail"]
    assert await event_count(database) == before
    assert await database.pool.fetchval("SELECT count(*) FROM scim_users") == users
    # What was kept before stays readable; a plain user is still welcome.
    assert (await get_user(client, auth, kept))[CUSTOM] == {"CustomAttribute": "blue"}
    await post_user(client, auth, entra_user("plain@contoso.com"))


async def test_log_history_and_rebuild_name_extension_attributes(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    reader = await audit_auth(database)
    user_id = (await post_user(client, auth, custom_user()))["id"]
    await patch(client, auth, user_id, {"op": "Replace", "path": ATTRIBUTE, "value": "green"})
    await settled(client, reader)
    r = await client.get(f"/audit/v1/resources/{user_id}/history", headers=reader)
    created, updated = (await r.json())["entries"]
    assert {"displayName": ATTRIBUTE, "oldValue": None, "newValue": "blue"} in created[
        "modifiedProperties"
    ]
    assert updated["modifiedProperties"] == [
        {"displayName": ATTRIBUTE, "oldValue": "blue", "newValue": "green"}
    ]
    r = await client.get(
        f"/audit/v1/resources/{user_id}",
        params={"at": created["activityDateTime"]},
        headers=reader,
    )
    assert (await r.json())[CUSTOM] == {"CustomAttribute": "blue"}

    await settle(database)
    before = await snapshot(database)
    reports = await rebuild_all(database)
    assert [r.name for r in reports] == list(PROJECTIONS)
    assert not any(r.drift for r in reports), [r.diffs for r in reports]
    assert await snapshot(database) == before


GROUP_EXT = "urn:ietf:params:scim:schemas:extension:CustomExtensionName:2.0:Group"


async def test_groups_keep_undeclared_extension_attributes(
    client: Client, auth: dict[str, str], database: Database, fresh_dsn: str
) -> None:
    reader = await audit_auth(database)
    body = {"schemas": [GROUP], "displayName": "Sales", GROUP_EXT: {"CostCentre": "CC-1"}}
    r = await client.post("/scim/v2/Groups", json=body, headers=headers(auth))
    assert r.status == 201, await r.text()
    created = await r.json()
    group_id = created["id"]
    assert created[GROUP_EXT] == {"CostCentre": "CC-1"} and GROUP_EXT in created["schemas"]
    r = await client.get(f"/scim/v2/Groups/{group_id}?excludedAttributes=members", headers=auth)
    assert (await r.json())[GROUP_EXT] == {"CostCentre": "CC-1"}
    names = [name for name, _ in await domain_events(database, group_id)]
    assert names == ["GroupCreated", "GroupAttributesChanged"]
    await asyncio.sleep(0.01)
    after_create = datetime.now(UTC).isoformat()
    await asyncio.sleep(0.01)

    async def group_patch(*operations: dict[str, Any], status: int = 204) -> None:
        r = await client.patch(
            f"/scim/v2/Groups/{group_id}",
            json={"schemas": [PATCH_OP], "Operations": list(operations)},
            headers=headers(auth),
        )
        assert r.status == status, await r.text()

    async def found(query: str) -> list[str]:
        r = await client.get(f"/scim/v2/Groups?{query}", headers=auth)
        assert r.status == 200, await r.text()
        return [g["id"] for g in (await r.json())["Resources"]]

    assert await found(f'filter={GROUP_EXT}:CostCentre eq "cc-1"') == [group_id]
    await group_patch({"op": "Replace", "path": f"{GROUP_EXT}:CostCentre", "value": "CC-2"})
    await group_patch({"op": "add", "value": {f"{GROUP_EXT}:Region": "EMEA"}})
    before = await event_count(database)
    await group_patch({"op": "Replace", "path": f"{GROUP_EXT}:costcentre", "value": "CC-2"})
    assert await event_count(database) == before  # unchanged: nothing appended
    r = await client.get(f"/scim/v2/Groups/{group_id}", headers=auth)
    assert (await r.json())[GROUP_EXT] == {"CostCentre": "CC-2", "Region": "EMEA"}
    assert await found(f'filter={GROUP_EXT}:CostCentre eq "cc-1"') == []
    await group_patch({"op": "Remove", "path": f"{GROUP_EXT}:Region"})
    r = await client.put(
        f"/scim/v2/Groups/{group_id}",
        json={"schemas": [GROUP], "displayName": "Sales", GROUP_EXT: {"CostCentre": "CC-3"}},
        headers=headers(auth),
    )
    assert r.status == 200 and (await r.json())[GROUP_EXT] == {"CostCentre": "CC-3"}

    await settled(client, reader)
    r = await client.get(f"/audit/v1/resources/{group_id}/history", headers=reader)
    entries = (await r.json())["entries"]
    changes = [p for e in entries for p in e["modifiedProperties"]]
    assert {"displayName": f"{GROUP_EXT}:CostCentre", "oldValue": "CC-1", "newValue": "CC-2"} in (
        changes
    )
    r = await client.get(
        f"/audit/v1/resources/{group_id}",
        params={"at": after_create},
        headers=reader,
    )
    assert (await r.json())[GROUP_EXT] == {"CostCentre": "CC-1"}

    await settle(database)
    before_rebuild = await snapshot(database)
    assert not any(r.drift for r in await rebuild_all(database))
    assert await snapshot(database) == before_rebuild

    code, _, err = await run(
        "tenants", "set", "acme", "--undeclared", "reject", "--database-url", fresh_dsn
    )
    assert code == 0, err
    before = await event_count(database)
    body = {"schemas": [GROUP], "displayName": "Ops", GROUP_EXT: {"CostCentre": "CC-9"}}
    r = await client.post("/scim/v2/Groups", json=body, headers=headers(auth))
    assert r.status == 400 and GROUP_EXT in (await r.json())["detail"]
    await group_patch({"op": "add", "path": f"{GROUP_EXT}:Region", "value": "x"}, status=400)
    assert await event_count(database) == before


BADGE = "urn:example:params:scim:schemas:extension:Badge:2.0:User"
TEAM = "urn:example:params:scim:schemas:extension:Team:2.0:Group"
BADGE_SCHEMA = {
    "id": BADGE,
    "name": "Badge",
    "attributes": [
        {"name": "number", "type": "string"},
        {"name": "onSite", "type": "boolean"},
        {"name": "level", "type": "integer"},
        {"name": "allowance", "type": "decimal"},
        {"name": "hired", "type": "dateTime"},
        {"name": "portrait", "type": "reference", "returned": "request"},
        {"name": "pin", "type": "string", "returned": "never"},
        {
            "name": "doors",
            "type": "complex",
            "multiValued": True,
            "subAttributes": [
                {"name": "value", "type": "string"},
                {"name": "floor", "type": "integer"},
            ],
        },
    ],
}
TEAM_SCHEMA = {"id": TEAM, "name": "Team", "attributes": [{"name": "code", "type": "string"}]}


async def test_declared_extensions_are_accepted_typed_and_described(
    client: Client, auth: dict[str, str], database: Database, fresh_dsn: str, tmp_path: Any
) -> None:
    db = ("--database-url", fresh_dsn)
    badge_file, team_file = tmp_path / "badge.json", tmp_path / "team.json"
    badge_file.write_bytes(orjson.dumps(BADGE_SCHEMA))
    team_file.write_bytes(orjson.dumps(TEAM_SCHEMA))
    for args in (
        ("schemas", "add", "--tenant", "acme", str(badge_file)),
        ("schemas", "add", "--tenant", "acme", str(team_file), "--resource-type", "Group"),
        ("tenants", "set", "acme", "--undeclared", "reject"),
    ):
        code, _, err = await run(*args, *db)
        assert code == 0, err
    code, out, _ = await run("schemas", "list", "--tenant", "acme", "--json", *db)
    listed = [orjson.loads(line) for line in out.splitlines()]
    assert [(s["urn"], s["resourceType"]) for s in listed] == [(BADGE, "User"), (TEAM, "Group")]
    code, out, _ = await run("schemas", "show", "--tenant", "acme", BADGE.upper(), *db)
    assert code == 0 and orjson.loads(out)["attributes"][2]["type"] == "integer"
    bad_file = tmp_path / "bad.json"
    bad_file.write_bytes(orjson.dumps({"id": "nope", "attributes": []}))
    code, _, err = await run("schemas", "add", "--tenant", "acme", str(bad_file), *db)
    assert code == 2 and "URN" in err

    # /Schemas and /ResourceTypes describe what this tenant accepts.
    r = await client.get("/scim/v2/Schemas", headers=auth)
    ids = [s["id"] for s in (await r.json())["Resources"]]
    assert BADGE in ids and TEAM in ids
    r = await client.get(f"/scim/v2/Schemas/{BADGE}", headers=auth)
    attributes = (await r.json())["attributes"]
    assert [a["name"] for a in attributes][:3] == ["number", "onSite", "level"]
    assert {a["name"]: a["returned"] for a in attributes}["pin"] == "never"
    r = await client.get("/scim/v2/ResourceTypes/User", headers=auth)
    assert {"schema": BADGE, "required": False} in (await r.json())["schemaExtensions"]

    body = entra_user("badge@contoso.com")
    body[BADGE.lower()] = {
        "Number": "B-7",
        "onSite": "True",
        "level": 3,
        "allowance": 12.5,
        "hired": "2026-01-05T09:00:00Z",
        "portrait": "https://example.com/p.png",
        "doors": {"value": "north", "floor": 2},
        "pin": "1234",
    }
    user = await post_user(client, auth, body)  # accepted under --undeclared reject
    # returned: never is never sent back, returned: request only when asked for.
    assert "pin" not in user[BADGE] and "portrait" not in user[BADGE]
    r = await client.get(
        f"/scim/v2/Users/{user['id']}?attributes={BADGE}:portrait,{BADGE}:pin", headers=auth
    )
    assert (await r.json())[BADGE] == {"portrait": "https://example.com/p.png"}
    listed = await find(client, auth, f"attributes={BADGE}")
    assert "pin" not in listed["Resources"][0][BADGE]
    assert "portrait" in listed["Resources"][0][BADGE]
    stored = await database.pool.fetchval(
        "SELECT resource FROM scim_users WHERE user_name = $1", "badge@contoso.com"
    )
    assert stored[BADGE]["pin"] == "1234"  # kept, only not returned
    user = await get_user(client, auth, user["id"])
    user[BADGE]["portrait"] = "https://example.com/p.png"
    assert user[BADGE] == {
        "allowance": 12.5,
        "doors": [{"floor": 2, "value": "north"}],
        "hired": "2026-01-05T09:00:00Z",
        "level": 3,
        "number": "B-7",
        "onSite": True,
        "portrait": "https://example.com/p.png",
    }
    patched = await patch(
        client, auth, user["id"], {"op": "Replace", "path": f"{BADGE}:onSite", "value": "False"}
    )
    assert patched[BADGE]["onSite"] is False
    found = await find(client, auth, f"filter={BADGE}:level ge 3 and {BADGE}:doors.floor eq 2")
    assert [u["id"] for u in found["Resources"]] == [user["id"]]

    before = await event_count(database)
    for name, value in (("level", "three"), ("hired", "someday"), ("onSite", 1), ("colour", "x")):
        bad = entra_user(f"{name}@contoso.com")
        bad[BADGE] = {name: value}
        r = await client.post("/scim/v2/Users", json=bad, headers=headers(auth))
        error = await r.json()
        assert r.status == 400 and error["scimType"] == "invalidValue", error
        assert f"{BADGE}:{name}" in error["detail"]
    await patch(
        client, auth, user["id"], {"op": "add", "value": {f"{BADGE}:level": "x"}}, status=400
    )
    assert await event_count(database) == before

    group = {"schemas": [GROUP], "displayName": "Ops", TEAM: {"CODE": "T1"}}
    r = await client.post("/scim/v2/Groups", json=group, headers=headers(auth))
    assert r.status == 201 and (await r.json())[TEAM] == {"code": "T1"}
    group_id = (await r.json())["id"]
    r = await client.patch(
        f"/scim/v2/Groups/{group_id}",
        json={
            "schemas": [PATCH_OP],
            "Operations": [{"op": "add", "path": f"{TEAM}:code", "value": 5}],
        },
        headers=headers(auth),
    )
    assert r.status == 400 and f"{TEAM}:code" in (await r.json())["detail"]

    code, _, err = await run("schemas", "remove", "--tenant", "acme", BADGE, *db)
    assert code == 0, err
    r = await client.get("/scim/v2/Schemas", headers=auth)
    assert BADGE not in [s["id"] for s in (await r.json())["Resources"]]
    r = await client.post("/scim/v2/Users", json={**body, "userName": "x@y"}, headers=headers(auth))
    assert r.status == 400 and BADGE.lower() in (await r.json())["detail"]


async def test_declared_unique_attribute_is_unique_per_tenant(
    client: Client, auth: dict[str, str], database: Database, tmp_path: Any
) -> None:
    schema = {
        "id": BADGE,
        "attributes": [{"name": "number", "type": "string", "uniqueness": "server"}],
    }
    async with database.pool.acquire() as conn:
        await declare(conn, database.store, "acme", parse_declaration(schema), "User", "test")
        other = await create_tenant(conn, "other")

    def badge_user(name: str, number: str) -> dict[str, Any]:
        body = entra_user(name)
        body[BADGE] = {"number": number}
        return body

    first = await post_user(client, auth, badge_user("a@contoso.com", "B-1"))
    before = await event_count(database)
    r = await client.post(
        "/scim/v2/Users", json=badge_user("b@contoso.com", "b-1"), headers=headers(auth)
    )
    assert r.status == 409 and (await r.json())["scimType"] == "uniqueness"
    assert f"{BADGE}:number" in (await r.json())["detail"]
    second = await post_user(client, auth, badge_user("b@contoso.com", "B-2"))
    await patch(
        client,
        auth,
        second["id"],
        {"op": "Replace", "path": f"{BADGE}:number", "value": "B-1"},
        status=409,
    )
    # The user's own value, and another tenant's users, are no conflict.
    await patch(client, auth, first["id"], {"op": "Replace", "path": "displayName", "value": "A"})
    other_auth = {"Authorization": f"Bearer {other.token}"}
    await post_user(client, other_auth, badge_user("c@contoso.com", "B-1"))
    assert await event_count(database) == before + 3

    # Concurrent creates of one value: exactly one wins.
    results = await asyncio.gather(
        *(
            client.post(
                "/scim/v2/Users",
                json=badge_user(f"race{i}@contoso.com", "RACE"),
                headers=headers(auth),
            )
            for i in range(6)
        )
    )
    assert sorted(r.status for r in results) == [201, 409, 409, 409, 409, 409]

    # Its unique index (the tenant's rows) serves the filter; removing the declaration drops
    # it, another tenant's declaring the same attribute has its own.
    tenant_id = await database.pool.fetchval("SELECT id FROM tenants WHERE name = 'acme'")
    declared = {BADGE.casefold(): parse_declaration(schema)}

    def lookup(tenant: Any, value: str = "b-1") -> tuple[str, list[Any]]:
        params = SqlParams([tenant])
        where = user_filter_sql(f'{BADGE}:number eq "{value}"', params, declared)
        return f"u.tenant_id = $1 AND {where}", params.values

    assert await lookup_plan(database, *lookup(tenant_id)) == 1
    # The WHERE a list query runs: its cached generic plan (the one PostgreSQL keeps after
    # five executions of a prepared statement) uses the index too, without replanning.
    params = SqlParams([tenant_id])
    where = tenant_where(USERS_VIEW, tenant_id, f'{BADGE}:number eq "b-1"', params, declared)
    async with database.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE listed AS SELECT u.id FROM scim_users u WHERE {where}")
        literals = ", ".join(f"'{value}'" for value in params.values)  # a UUID, "b-1"
        plan = await conn.fetch(f"EXPLAIN EXECUTE listed({literals})")
        await conn.execute("DEALLOCATE listed")
    assert "scim_users_xattr_" in "\n".join(row[0] for row in plan), plan
    params = SqlParams([tenant_id])
    plain = user_filter_sql(f'{CUSTOM}:CustomAttribute eq "b-1"', params)
    assert await lookup_plan(database, f"u.tenant_id = $1 AND {plain}", params.values) == 0
    async with database.pool.acquire() as conn:
        await declare(conn, database.store, "other", parse_declaration(schema), "User", "test")
        assert await lookup_plan(database, *lookup(other.tenant_id)) == 1
        assert await withdraw(conn, database.store, "acme", BADGE, "test")
        assert await lookup_plan(database, *lookup(tenant_id)) == 0
        assert await lookup_plan(database, *lookup(other.tenant_id)) == 1
        assert await withdraw(conn, database.store, "other", BADGE, "test")
    assert await lookup_plan(database, *lookup(other.tenant_id)) == 0
    assert (
        await database.pool.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE indexname LIKE '%xattr%'"
        )
        == 0
    )
    # Without it, the duplicate value can be written; then it cannot be declared unique.
    await post_user(client, auth, badge_user("dup@contoso.com", "B-2"))
    async with database.pool.acquire() as conn:
        with pytest.raises(BadDeclaration, match="more than one user"):
            await declare(conn, database.store, "acme", parse_declaration(schema), "User", "t")


async def lookup_plan(database: Database, where: str, args: list[Any]) -> int:
    """How many of the declared attributes' indexes a query of scim_users uses (sequential
    scans off: the test's tables are small)."""
    async with database.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        plan = await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) SELECT u.id FROM scim_users u WHERE {where}", *args
        )
    return str(plan).count("scim_users_xattr_")


async def test_declared_required_read_only_and_write_only(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    schema = {
        "id": BADGE,
        "attributes": [
            {"name": "number", "type": "string", "required": True},
            {"name": "issuedBy", "type": "string", "mutability": "readOnly"},
            {"name": "secret", "type": "string", "mutability": "writeOnly"},
            {"name": "colour", "type": "string"},
        ],
    }
    async with database.pool.acquire() as conn:
        await declare(conn, database.store, "acme", parse_declaration(schema), "User", "test")
    before = await event_count(database)
    missing = entra_user("missing@contoso.com")
    missing[BADGE] = {"colour": "blue"}
    r = await client.post("/scim/v2/Users", json=missing, headers=headers(auth))
    error = await r.json()
    assert r.status == 400 and error["scimType"] == "invalidValue", error
    assert f"{BADGE}:number is required" in error["detail"]
    assert await event_count(database) == before

    # A user without the extension at all is not refused for it.
    await post_user(client, auth, entra_user("plain@contoso.com"))
    body = entra_user("badge@contoso.com")
    body[BADGE] = {"number": "B-1", "issuedBy": "me", "secret": "s3cr3t"}
    user = await post_user(client, auth, body)
    assert user[BADGE] == {"number": "B-1"}  # readOnly ignored, writeOnly never returned
    stored = await database.pool.fetchval(
        "SELECT resource FROM scim_users WHERE user_name = $1", "badge@contoso.com"
    )
    assert stored[BADGE] == {"number": "B-1", "secret": "s3cr3t"}
    before = await event_count(database)
    await patch(client, auth, user["id"], {"op": "remove", "path": f"{BADGE}:number"}, status=400)
    assert await event_count(database) == before


async def test_declaring_is_recorded_in_the_provisioning_log(
    client: Client, auth: dict[str, str], database: Database, fresh_dsn: str, tmp_path: Any
) -> None:
    db = ("--database-url", fresh_dsn)
    reader = await audit_auth(database)
    team_file = tmp_path / "team.json"
    team_file.write_bytes(orjson.dumps(TEAM_SCHEMA))
    code, _, err = await run(
        "schemas", "add", "--tenant", "acme", str(team_file), "--resource-type", "Group",
        "--by", "alice", *db,
    )  # fmt: skip
    assert code == 0, err
    wider = {**TEAM_SCHEMA, "attributes": [{"name": "code", "caseExact": True}, {"name": "site"}]}
    team_file.write_bytes(orjson.dumps(wider))
    code, _, err = await run(
        "schemas", "add", "--tenant", "acme", str(team_file), "--resource-type", "Group", *db
    )
    assert code == 0, err
    code, _, err = await run(
        "schemas", "remove", "--tenant", "acme", TEAM.upper(), "--by", "bob", *db
    )
    assert code == 0, err
    # Nothing declared, nothing recorded.
    code, _, _ = await run("schemas", "remove", "--tenant", "acme", TEAM, "--by", "bob", *db)
    assert code == 2

    entries = list(reversed((await settled(client, reader))["entries"]))
    assert [(e["provisioningAction"], e["targetIdentity"]["displayName"]) for e in entries] == [
        ("create", TEAM),
        ("update", TEAM),
        ("delete", TEAM),
    ]
    created, updated, removed = entries
    assert created["initiatedBy"]["displayName"] == "alice"
    assert removed["initiatedBy"]["displayName"] == "bob"
    assert "(scimledger CLI)" in updated["initiatedBy"]["displayName"]
    assert created["targetIdentity"]["identityType"] == "Schema"
    assert created["request"]["path"] == f"schemas add --resource-type Group {TEAM}"
    assert created["provisioningStatusInfo"]["status"] == "success"
    assert [p["displayName"] for p in created["modifiedProperties"]] == [f"{TEAM}:code"]
    (code_property,) = created["modifiedProperties"]
    assert code_property["oldValue"] is None
    assert orjson.loads(code_property["newValue"])["type"] == "string"
    assert {
        p["displayName"]: (p["oldValue"] is None, p["newValue"] is None)
        for p in (updated["modifiedProperties"])
    } == {f"{TEAM}:code": (False, False), f"{TEAM}:site": (True, False)}
    assert orjson.loads(updated["modifiedProperties"][0]["newValue"])["caseExact"] is True
    assert [p["newValue"] for p in removed["modifiedProperties"]] == [None, None]

    # The CLI lists them like any other entry, and finds them by the URN.
    code, out, err = await run(
        "audit", "list", "--tenant", "acme", "--identity", "Team:2.0", "--json", *db
    )
    assert code == 0, err
    listed = [orjson.loads(line) for line in out.splitlines()]
    assert [e["provisioningAction"] for e in listed] == ["delete", "update", "create"]


async def test_declared_immutable_case_exact_sorting_and_unique_groups(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    badge = {
        "id": BADGE,
        "attributes": [
            {"name": "code", "caseExact": True},
            {"name": "nick"},
            {"name": "serial", "mutability": "immutable"},
            {"name": "rank", "type": "integer"},
            {"name": "onSite", "type": "boolean"},
        ],
    }
    team = {
        "id": TEAM,
        "attributes": [
            {"name": "code", "uniqueness": "server"},
            {"name": "since", "mutability": "immutable"},
        ],
    }
    async with database.pool.acquire() as conn:
        await declare(conn, database.store, "acme", parse_declaration(badge), "User", "t")
        await declare(conn, database.store, "acme", parse_declaration(team), "Group", "t")

    def badge_user(name: str, **values: Any) -> dict[str, Any]:
        body = entra_user(name)
        body[BADGE] = values
        return body

    one = await post_user(
        client,
        auth,
        badge_user("one@contoso.com", code="AbC", nick="Bob", serial="S1", rank=3, onSite=True),
    )
    two = await post_user(
        client, auth, badge_user("two@contoso.com", code="abc", nick="alice", rank=10, onSite=False)
    )

    async def ids(query: str) -> list[str]:
        return [u["id"] for u in (await find(client, auth, query))["Resources"]]

    # caseExact true compares exactly, false (the default) case-insensitively; numbers and
    # booleans as such.
    assert await ids(f'filter={BADGE}:code eq "AbC"') == [one["id"]]
    assert await ids(f'filter={BADGE}:code eq "abc"') == [two["id"]]
    assert await ids(f'filter={BADGE}:code sw "A"') == [one["id"]]
    assert await ids(f'filter={BADGE}:nick eq "BOB"') == [one["id"]]
    assert await ids(f"filter={BADGE}:rank gt 5") == [two["id"]]
    assert await ids(f"filter={BADGE}:onSite eq true") == [one["id"]]
    r = await client.get(f'/scim/v2/Users?filter={BADGE}:rank eq "x"', headers=auth)
    assert r.status == 400 and (await r.json())["scimType"] == "invalidFilter"
    # sortBy: declared attributes sort as their type (caseExact false: case-insensitively).
    assert await ids(f"sortBy={BADGE}:rank") == [one["id"], two["id"]]
    assert await ids(f"sortBy={BADGE}:rank&sortOrder=descending") == [two["id"], one["id"]]
    assert await ids(f"sortBy={BADGE}:nick") == [two["id"], one["id"]]
    r = await client.get(f"/scim/v2/Users?sortBy={CUSTOM}:CustomAttribute", headers=auth)
    assert r.status == 400 and (await r.json())["scimType"] == "invalidValue"

    # immutable: set once (at creation or later), then the same value or a 400 mutability.
    before = await event_count(database)
    for operation in (
        {"op": "Replace", "path": f"{BADGE}:serial", "value": "S2"},
        {"op": "Remove", "path": f"{BADGE}:serial"},
        {"op": "replace", "value": {f"{BADGE}:serial": "S3"}},
    ):
        error = await patch(client, auth, one["id"], operation, status=400)
        assert error["scimType"] == "mutability" and f"{BADGE}:serial" in error["detail"]
    r = await client.put(
        f"/scim/v2/Users/{one['id']}",
        json=badge_user("one@contoso.com", code="AbC", serial="S9"),
        headers=headers(auth),
    )
    assert r.status == 400 and (await r.json())["scimType"] == "mutability"
    assert await event_count(database) == before
    await patch(
        client, auth, one["id"], {"op": "Replace", "path": f"{BADGE}:serial", "value": "S1"}
    )
    patched = await patch(
        client, auth, two["id"], {"op": "Add", "path": f"{BADGE}:serial", "value": "S7"}
    )
    assert patched[BADGE]["serial"] == "S7"
    await patch(
        client, auth, two["id"], {"op": "Add", "path": f"{BADGE}:serial", "value": "S8"}, status=400
    )

    # Groups: uniqueness server (409, case-insensitively), immutable, filter and sortBy.
    async def group(body: dict[str, Any], status: int = 201) -> dict[str, Any]:
        r = await client.post(
            "/scim/v2/Groups", json={"schemas": [GROUP], **body}, headers=headers(auth)
        )
        assert r.status == status, await r.text()
        return dict(await r.json())

    async def group_patch(group_id: str, operation: dict[str, Any], status: int) -> Any:
        r = await client.patch(
            f"/scim/v2/Groups/{group_id}",
            json={"schemas": [PATCH_OP], "Operations": [operation]},
            headers=headers(auth),
        )
        assert r.status == status, await r.text()
        return await r.json() if status != 204 else None

    ops = await group({"displayName": "Ops", TEAM: {"code": "T1", "since": "2020"}})
    before = await event_count(database)
    error = await group({"displayName": "Ops2", TEAM: {"code": "t1"}}, status=409)
    assert error["scimType"] == "uniqueness" and f"{TEAM}:code" in error["detail"]
    assert await event_count(database) == before
    sales = await group({"displayName": "Sales", TEAM: {"code": "T0"}})
    error = await group_patch(
        sales["id"], {"op": "Replace", "path": f"{TEAM}:code", "value": "T1"}, 409
    )
    assert error["scimType"] == "uniqueness"
    error = await group_patch(
        ops["id"], {"op": "Replace", "path": f"{TEAM}:since", "value": "2021"}, 400
    )
    assert error["scimType"] == "mutability"
    r = await client.put(
        f"/scim/v2/Groups/{ops['id']}",
        json={"schemas": [GROUP], "displayName": "Ops", TEAM: {"code": "T1"}},
        headers=headers(auth),
    )
    assert r.status == 400 and (await r.json())["scimType"] == "mutability"
    await group_patch(ops["id"], {"op": "Replace", "path": "displayName", "value": "Ops!"}, 204)
    r = await client.get(
        f'/scim/v2/Groups?filter={TEAM}:code eq "t1"&sortBy={TEAM}:code', headers=auth
    )
    assert [g["id"] for g in (await r.json())["Resources"]] == [ops["id"]]
    r = await client.get(
        f"/scim/v2/Groups?sortBy={TEAM}:code&excludedAttributes=members", headers=auth
    )
    assert [g["id"] for g in (await r.json())["Resources"]] == [sales["id"], ops["id"]]


# The Done-when test of issue 15: two declared extensions (one User, one Group) of every
# attribute type, one multi-valued complex; what is driven below comes from /Schemas and
# /ResourceTypes as the tenant sees them, not from these declarations.
ENTERPRISE_URN = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
EVERY_USER = "urn:example:params:scim:schemas:extension:Every:2.0:User"
EVERY_GROUP = "urn:example:params:scim:schemas:extension:Every:2.0:Group"
_SUBS = [{"name": "value", "type": "string"}, {"name": "floor", "type": "integer"}]
EVERY_TYPES = [
    {"name": "text", "type": "string"},
    {"name": "flag", "type": "boolean"},
    {"name": "count", "type": "integer"},
    {"name": "amount", "type": "decimal"},
    {"name": "since", "type": "dateTime"},
    {"name": "link", "type": "reference", "referenceTypes": ["external"]},
    {"name": "tags", "type": "string", "multiValued": True},
    {"name": "desk", "type": "complex", "subAttributes": _SUBS},
    {"name": "doors", "type": "complex", "multiValued": True, "subAttributes": _SUBS},
]


# Resource types a reference may name (RFC 7643 §7 referenceTypes) and their endpoints.
ENDPOINTS = {"User": "/scim/v2/Users", "Group": "/scim/v2/Groups"}


def resource_reference(attribute: dict[str, Any]) -> str | None:
    """The resource type a complex attribute refers to, by its `$ref` sub-attribute's
    referenceTypes (RFC 7643 §2.4: then `value` is that resource's id), if it does."""
    for sub in attribute.get("subAttributes", []):
        if sub["name"] == "$ref":
            known = [t for t in sub.get("referenceTypes", []) if t in ENDPOINTS]
            if known:
                return str(known[0])
    return None


def writable(attribute: dict[str, Any]) -> bool:
    """Whether a client writes the attribute and reads it back, by its characteristics."""
    return attribute.get("mutability", "readWrite") not in ("readOnly", "writeOnly") and (
        attribute.get("returned", "default") in ("default", "always")
    )


def sample(attribute: dict[str, Any], n: int, key: str, refs: dict[str, list[str]]) -> Any:
    """The n-th value (1 or 2) of an attribute, by the characteristics /Schemas gives; `key`
    keeps strings apart between resources (uniqueness), `refs` holds ids of each resource
    type that a reference attribute can name."""
    kind = attribute.get("type", "string")
    canonical = attribute.get("canonicalValues")
    target = resource_reference(attribute)
    if kind == "complex":
        one = {
            sub["name"]: sample({**sub, "multiValued": False}, n, key, refs)
            for sub in attribute["subAttributes"]
            # $ref is derived from value; readOnly ones are not written (RFC 7643 §2.4).
            if writable(sub) and not (target and sub["name"] == "$ref")
        }
        if target is not None:
            one["value"] = refs[target][n - 1]
            if "type" in one:
                one["type"] = target
    elif canonical:
        one = canonical[(n - 1) % len(canonical)]
    else:
        one = {
            "string": f"v{n}-{attribute['name']}-{key}",
            "boolean": n == 2,
            "integer": n,
            "decimal": n + 0.5,
            "dateTime": f"2026-01-0{n}T09:00:00Z",
            "reference": f"https://example.com/{attribute['name']}/{key}/{n}",
            "binary": f"djEt{n}{key}".replace("-", ""),  # base64 text
        }[kind]
    return [one] if attribute.get("multiValued") else one


def within(sent: Any, got: Any) -> bool:
    """Whether `got` holds what was sent (the server adds derived values: $ref, type)."""
    if isinstance(sent, dict):
        return isinstance(got, dict) and all(within(v, got.get(k)) for k, v in sent.items())
    if isinstance(sent, list):
        return (
            isinstance(got, list)
            and len(got) == len(sent)
            and all(within(s, g) for s, g in zip(sent, got, strict=True))
        )
    return bool(sent == got)


def filter_of(path: str, attribute: dict[str, Any], value: Any) -> str:
    """A filter that finds `value` (sample()) of the attribute at `path`."""
    one = value[0] if attribute.get("multiValued") else value
    if attribute.get("type") == "complex":
        sub = next(s["name"] for s in attribute["subAttributes"] if s["name"] in one)
        path, one = f"{path}.{sub}", one[sub]
    return f"{path} eq {orjson.dumps(one).decode()}"


async def test_every_attribute_schemas_lists_round_trips(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    """Every attribute /Schemas lists for the tenant (core User, enterprise User, Group and the
    two declared extensions) through POST, GET, PATCH (both styles), PUT, filter, attributes=
    and removal; which ones take part, and how, comes from their own characteristics."""
    async with database.pool.acquire() as conn:
        for urn, kind in ((EVERY_USER, "User"), (EVERY_GROUP, "Group")):
            schema = parse_declaration({"id": urn, "attributes": EVERY_TYPES})
            await declare(conn, database.store, "acme", schema, kind, "test")

    r = await client.get("/scim/v2/ResourceTypes", headers=auth)
    types = (await r.json())["Resources"]
    r = await client.get("/scim/v2/Schemas", headers=auth)
    listed = {s["id"]: s for s in (await r.json())["Resources"]}
    # Each resource type's schemas: its core one, then its extensions.
    driven = [
        (t, urn, attribute)
        for t in types
        for urn in (t["schema"], *(e["schema"] for e in t.get("schemaExtensions", [])))
        for attribute in listed[urn]["attributes"]
    ]
    assert {urn for _, urn, _ in driven} == set(listed)  # every schema listed is driven
    assert {urn for _, urn, _ in driven} >= {EVERY_USER, EVERY_GROUP, ENTERPRISE_URN}
    assert len([d for d in driven if d[1] in (EVERY_USER, EVERY_GROUP)]) == 2 * len(EVERY_TYPES)

    # Resources a reference attribute (manager, members) can name: two of each type.
    refs: dict[str, list[str]] = {"User": [], "Group": []}
    for n in (1, 2):
        refs["User"].append((await post_user(client, auth, entra_user(f"ref{n}@c.com")))["id"])
        r = await client.post(
            "/scim/v2/Groups", json={"displayName": f"Ref {n}"}, headers=headers(auth)
        )
        refs["Group"].append((await r.json())["id"])

    done, ignored = [], []
    for i, (resource_type, urn, attribute) in enumerate(driven):
        name, core = attribute["name"], resource_type["schema"]
        if attribute.get("mutability") == "readOnly":
            # RFC 7644 §3.5.1: what a client sends for it is ignored (User's groups).
            value, base = sample(attribute, 1, str(i), refs), {"schemas": [core]}
            for other in listed[core]["attributes"]:
                if other.get("required") and writable(other):
                    base[other["name"]] = sample(other, 3, str(i), refs)
            body = {**base, name: value} if urn == core else {**base, urn: {name: value}}
            r = await client.post(
                ENDPOINTS[resource_type["name"]], json=body, headers=headers(auth)
            )
            assert r.status == 201, (name, await r.text())
            created = await r.json()
            held = created.get(name) if urn == core else created.get(urn, {}).get(name)
            assert not within(value, held), (name, held)
            ignored.append(name)
            continue
        if not writable(attribute):
            continue  # writeOnly or not returned: nothing to read back
        full = name if urn == core else f"{urn}:{name}"  # as Entra names them
        url = ENDPOINTS[resource_type["name"]]
        first, second = (sample(attribute, n, str(i), refs) for n in (1, 2))
        # The core schema's required attributes, each resource its own values.
        base: dict[str, Any] = {"schemas": [core]}
        for other in listed[core]["attributes"]:
            if other.get("required") and writable(other):
                base[other["name"]] = sample(other, 3, str(i), refs)

        def body(value: Any, urn: str = urn, name: str = name, base: Any = base) -> Any:
            if urn == base["schemas"][0]:
                return {**base, name: value}
            return {**base, "schemas": [*base["schemas"], urn], urn: {name: value}}

        def read(resource: dict[str, Any], urn: str = urn, name: str = name) -> Any:
            holder = resource if urn == resource["schemas"][0] else resource.get(urn, {})
            return holder.get(name)

        async def current(rid: str, url: str = url) -> Any:
            r = await client.get(f"{url}/{rid}", headers=auth)
            assert r.status == 200, await r.text()
            return read(await r.json())

        async def patched(rid: str, operation: dict[str, Any], url: str = url) -> Any:
            body = {"schemas": [PATCH_OP], "Operations": [operation]}
            r = await client.patch(f"{url}/{rid}", json=body, headers=headers(auth))
            return r.status, await r.text()

        r = await client.post(url, json=body(first), headers=headers(auth))
        assert r.status == 201, (full, await r.text())
        created = await r.json()
        rid = created["id"]
        assert within(first, read(created)), (full, read(created))
        assert within(first, await current(rid)), full
        # PATCH, the default style (a path) and the aadOptscim062020 one (keys, no path).
        status, text = await patched(rid, {"op": "Replace", "path": full, "value": second})
        assert status in (200, 204), (full, text)
        assert within(second, await current(rid)), full
        status, text = await patched(rid, {"op": "replace", "value": {full: first}})
        assert status in (200, 204), (full, text)
        assert within(first, await current(rid)), full
        r = await client.put(f"{url}/{rid}", json=body(second), headers=headers(auth))
        assert r.status == 200, (full, await r.text())
        assert within(second, await current(rid)), full
        # filter finds it by the value it has, not by the one it had.
        for value, found in ((second, True), (first, False)):
            r = await client.get(
                url,
                params={
                    "filter": filter_of(full, attribute, value),
                    "excludedAttributes": "members",
                },
                headers=auth,
            )
            assert r.status == 200, (full, await r.text())
            ids = [x["id"] for x in (await r.json())["Resources"]]
            assert (rid in ids) == found, (full, value, ids)
        # attributes= selects it alone (with id and schemas, RFC 7644 §3.9).
        r = await client.get(f"{url}/{rid}", params={"attributes": full}, headers=auth)
        selected = await r.json()
        assert within(second, read(selected)), (full, selected)
        assert not set(selected) - {"id", "schemas", urn if urn != core else name}, selected
        # Removing it: a required attribute cannot go (400), any other is gone.
        status, text = await patched(rid, {"op": "Remove", "path": full})
        if attribute.get("required"):
            assert status == 400, (full, text)
            assert within(second, await current(rid)), full
        else:
            assert status in (200, 204), (full, text)
            assert not await current(rid), full
        done.append(full)
    # The core attributes took part, not only the declared ones.
    assert {"userName", "emails", "name", "active", "displayName", "members"} <= set(done)
    assert f"{ENTERPRISE_URN}:manager" in done and f"{EVERY_GROUP}:doors" in done
    assert ignored == ["groups"]


TYPED = "urn:example:params:scim:schemas:extension:Typed:2.0:User"


async def test_declared_typed_values_filter_sort_and_are_unique_as_their_type(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    schema = {
        "id": TYPED,
        "attributes": [
            {"name": "hired", "type": "dateTime"},
            {"name": "seat", "type": "integer", "uniqueness": "server"},
            {"name": "score", "type": "decimal", "uniqueness": "server"},
            {"name": "badgeAt", "type": "dateTime", "uniqueness": "server"},
            {"name": "lead", "type": "boolean", "uniqueness": "server"},
            {"name": "tags", "type": "string", "multiValued": True},
        ],
    }
    async with database.pool.acquire() as conn:
        await declare(conn, database.store, "acme", parse_declaration(schema), "User", "t")

    def typed_user(name: str, **values: Any) -> dict[str, Any]:
        body = entra_user(name)
        body[TYPED] = values
        return body

    # 2026-01-01T19:00Z, written with its +05:00 offset: as text it is after 20:00Z.
    early = await post_user(
        client, auth, typed_user("early@contoso.com", hired="2026-01-02T00:00:00+05:00", seat=9)
    )
    late = await post_user(
        client, auth, typed_user("late@contoso.com", hired="2026-01-01T20:00:00Z", seat=10)
    )
    assert early[TYPED]["hired"] == "2026-01-02T00:00:00+05:00"  # kept as sent

    async def ids(query: str) -> list[str]:
        return [u["id"] for u in (await find(client, auth, query))["Resources"]]

    hired = f"{TYPED}:hired"
    assert await ids(f'filter={hired} gt "2026-01-01T19:30:00Z"') == [late["id"]]
    assert await ids(f'filter={hired} lt "2026-01-01T19:30:00Z"') == [early["id"]]
    assert await ids(f'filter={hired} ge "2026-01-01T19:00:00Z"&sortBy={hired}') == [
        early["id"],
        late["id"],
    ]
    assert await ids(f'filter={hired} le "2026-01-01T19:00:00Z"') == [early["id"]]
    assert await ids(f'filter={hired} eq "2026-01-01T14:00:00-05:00"') == [early["id"]]
    # sortBy orders by the instant and by the number (as text: "10" < "9", "2026-01-02" last).
    assert await ids(f"sortBy={hired}") == [early["id"], late["id"]]
    assert await ids(f"sortBy={hired}&sortOrder=descending") == [late["id"], early["id"]]
    assert await ids(f"sortBy={TYPED}:seat") == [early["id"], late["id"]]
    # A multi-valued attribute is no sort key: a clear 400 invalidValue.
    r = await client.get(f"/scim/v2/Users?sortBy={TYPED}:tags", headers=auth)
    assert r.status == 400 and (await r.json())["scimType"] == "invalidValue"
    assert "tags" in (await r.json())["detail"]

    # uniqueness: server on an integer, a decimal, a dateTime and a boolean: equal as values
    # (10 and 10.0, one instant at two offsets), whatever their spelling.
    await patch(client, auth, early["id"], {"op": "Add", "path": f"{TYPED}:score", "value": 1.5})
    await patch(
        client,
        auth,
        early["id"],
        {"op": "Add", "path": f"{TYPED}:badgeAt", "value": "2026-03-01T10:00:00+01:00"},
    )
    await patch(client, auth, early["id"], {"op": "Add", "path": f"{TYPED}:lead", "value": True})
    before = await event_count(database)
    for name, value in (
        ("seat", 9),
        ("score", 1.50),
        ("badgeAt", "2026-03-01T09:00:00Z"),
        ("lead", "True"),
    ):
        error = await patch(
            client,
            auth,
            late["id"],
            {"op": "Replace", "path": f"{TYPED}:{name}", "value": value},
            status=409,
        )
        assert error["scimType"] == "uniqueness" and f"{TYPED}:{name}" in error["detail"], error
        r = await client.post(
            "/scim/v2/Users",
            json=typed_user(f"new-{name}@contoso.com", **{name: value}),
            headers=headers(auth),
        )
        assert r.status == 409 and (await r.json())["scimType"] == "uniqueness", name
    assert await event_count(database) == before
    await patch(client, auth, late["id"], {"op": "Replace", "path": f"{TYPED}:seat", "value": 11})
    await patch(
        client, auth, late["id"], {"op": "Replace", "path": f"{TYPED}:lead", "value": False}
    )
