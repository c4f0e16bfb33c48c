"""Entra ID's group requests from ENTRA.md, replayed end to end over HTTP against PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp.test_utils import TestClient

from infra.database import Database
from tests.test_entra_users import create as create_user
from tests.test_entra_users import event_count, headers

Client = TestClient[Any, Any]
SCIM = "application/scim+json"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
AD_GROUP = "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"


async def create_group(client: Client, auth: dict[str, str], name: str = "Sales") -> dict[str, Any]:
    r = await client.post(
        "/scim/v2/Groups",
        headers=headers(auth),
        json={
            "schemas": [GROUP, AD_GROUP],
            "externalId": str(uuid.uuid4()),
            "displayName": name,
            "members": [],
        },
    )
    assert r.status == 201, await r.text()
    assert r.headers["Content-Type"].startswith(SCIM)
    return dict(await r.json(content_type=None))


async def patch_group(
    client: Client,
    auth: dict[str, str],
    group_id: str,
    *ops: dict[str, Any],
    status: int = 204,
    query: str = "",
) -> Any:
    r = await client.patch(
        f"/scim/v2/Groups/{group_id}{query}",
        headers=headers(auth),
        json={"schemas": [PATCH_OP], "Operations": list(ops)},
    )
    assert r.status == status, await r.text()
    return None if status == 204 else await r.json(content_type=None)


async def members(client: Client, auth: dict[str, str], group_id: str) -> list[str]:
    r = await client.get(f"/scim/v2/Groups/{group_id}", headers=auth)
    assert r.status == 200
    body = await r.json(content_type=None)
    return sorted(m["value"] for m in body.get("members", []))


async def users(client: Client, auth: dict[str, str], n: int) -> list[str]:
    return [
        (await create_user(client, auth, user_name=f"m{i}@contoso.com"))["id"] for i in range(n)
    ]


async def test_entra_group_sequence(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    # Lookup before create: empty list, never 404.
    r = await client.get(
        "/scim/v2/Groups?excludedAttributes=members&filter=displayName+eq+%22Sales%22", headers=auth
    )
    assert r.status == 200
    assert (await r.json(content_type=None))["totalResults"] == 0
    group = await create_group(client, auth)
    assert group["displayName"] == "Sales" and group["meta"]["resourceType"] == "Group"
    assert group["schemas"] == [GROUP]
    a, b, c = await users(client, auth, 3)
    # Several members in one Add.
    await patch_group(
        client,
        auth,
        group["id"],
        {
            "op": "Add",
            "path": "members",
            "value": [
                {"$ref": None, "value": a},
                {"$ref": None, "value": b},
                {"$ref": None, "value": c},
            ],
        },
    )
    assert await members(client, auth, group["id"]) == sorted([a, b, c])
    # Default style removal: the member in value, only that one goes.
    await patch_group(
        client,
        auth,
        group["id"],
        {"op": "Remove", "path": "members", "value": [{"$ref": None, "value": a}]},
    )
    assert await members(client, auth, group["id"]) == sorted([b, c])
    # aadOptscim062020 style removal by filter path.
    await patch_group(
        client, auth, group["id"], {"op": "remove", "path": f'members[value eq "{b}"]'}
    )
    assert await members(client, auth, group["id"]) == [c]
    # Lookups that exclude members never carry them, by filter and by id.
    r = await client.get(
        "/scim/v2/Groups?excludedAttributes=members&filter=displayName+eq+%22sales%22", headers=auth
    )
    body = await r.json(content_type=None)
    assert body["totalResults"] == 1 and "members" not in body["Resources"][0]
    r = await client.get(f"/scim/v2/Groups/{group['id']}?excludedAttributes=members", headers=auth)
    body = await r.json(content_type=None)
    assert r.status == 200 and "members" not in body and body["displayName"] == "Sales"
    # Filter on members.value.
    r = await client.get(f'/scim/v2/Groups?filter=members.value eq "{c}"', headers=auth)
    assert [g["id"] for g in (await r.json(content_type=None))["Resources"]] == [group["id"]]
    # The user's groups attribute.
    r = await client.get(f"/scim/v2/Users/{c}", headers=auth)
    user = await r.json(content_type=None)
    assert [g["value"] for g in user.get("groups", [])] == [group["id"]]
    # Rename, then delete.
    await patch_group(
        client, auth, group["id"], {"op": "Replace", "path": "displayName", "value": "Sales EMEA"}
    )
    r = await client.delete(f"/scim/v2/Groups/{group['id']}", headers=auth)
    assert r.status == 204
    r = await client.get(f"/scim/v2/Groups/{group['id']}", headers=auth)
    assert r.status == 404
    assert (await r.json(content_type=None))["status"] == "404"


async def test_membership_noops_and_events(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    group = await create_group(client, auth)
    a, b = await users(client, auth, 2)
    await patch_group(
        client, auth, group["id"], {"op": "add", "path": "members", "value": [{"value": a}]}
    )
    before = await event_count(database)
    # Adding an existing member and removing a non-member change nothing and append nothing.
    await patch_group(
        client, auth, group["id"], {"op": "add", "path": "members", "value": [{"value": a}]}
    )
    await patch_group(
        client, auth, group["id"], {"op": "remove", "path": "members", "value": [{"value": b}]}
    )
    assert await event_count(database) == before
    # A one-member change is a small event whatever the group's size.
    await patch_group(
        client, auth, group["id"], {"op": "add", "path": "members", "value": [{"value": b}]}
    )
    state = await database.pool.fetchval(
        "SELECT convert_from(state, 'UTF8') FROM stored_events"
        " WHERE topic NOT LIKE 'domain.request:%' ORDER BY notification_id DESC LIMIT 1"
    )
    assert b in state and a not in state


async def test_replace_members_appends_only_the_difference(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    group = await create_group(client, auth)
    a, b, c = await users(client, auth, 3)
    await patch_group(
        client,
        auth,
        group["id"],
        {"op": "add", "path": "members", "value": [{"value": a}, {"value": b}]},
    )
    await patch_group(
        client,
        auth,
        group["id"],
        {"op": "replace", "path": "members", "value": [{"value": b}, {"value": c}]},
    )
    assert await members(client, auth, group["id"]) == sorted([b, c])
    import orjson

    raw = await database.pool.fetchval(
        "SELECT state FROM stored_events WHERE topic NOT LIKE 'domain.request:%'"
        " ORDER BY notification_id DESC LIMIT 1"
    )
    event = orjson.loads(raw)
    assert event["added"] == [c] and event["removed"] == [a]
    # Remove of members with no value removes all.
    await patch_group(client, auth, group["id"], {"op": "remove", "path": "members"})
    assert await members(client, auth, group["id"]) == []


async def test_unknown_member_is_400_naming_it_and_nothing_applied(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    group = await create_group(client, auth)
    (a,) = await users(client, auth, 1)
    ghost = str(uuid.uuid4())
    before = await event_count(database)
    body = await patch_group(
        client,
        auth,
        group["id"],
        {"op": "add", "path": "members", "value": [{"value": a}, {"value": ghost}]},
        status=400,
    )
    assert body["scimType"] == "invalidValue" and ghost in body["detail"]
    assert await members(client, auth, group["id"]) == []
    assert await event_count(database) == before


async def test_nested_groups_and_cycles(client: Client, auth: dict[str, str]) -> None:
    outer = await create_group(client, auth, "Outer")
    inner = await create_group(client, auth, "Inner")
    await patch_group(
        client,
        auth,
        outer["id"],
        {"op": "add", "path": "members", "value": [{"value": inner["id"]}]},
    )
    r = await client.get(f"/scim/v2/Groups/{outer['id']}", headers=auth)
    body = await r.json(content_type=None)
    assert body["members"][0]["type"] == "Group"
    assert body["members"][0]["$ref"].endswith(f"/Groups/{inner['id']}")
    # Inner containing Outer would make Outer contain itself.
    body = await patch_group(
        client,
        auth,
        inner["id"],
        {"op": "add", "path": "members", "value": [{"value": outer["id"]}]},
        status=400,
    )
    assert body["scimType"] == "invalidValue"
    body = await patch_group(
        client,
        auth,
        outer["id"],
        {"op": "add", "path": "members", "value": [{"value": outer["id"]}]},
        status=400,
    )
    # Deleting the inner group removes it from the outer one.
    r = await client.delete(f"/scim/v2/Groups/{inner['id']}", headers=auth)
    assert r.status == 204
    assert await members(client, auth, outer["id"]) == []


async def test_deleting_a_user_removes_it_from_every_group(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    g1 = await create_group(client, auth, "G1")
    g2 = await create_group(client, auth, "G2")
    a, b = await users(client, auth, 2)
    for g in (g1, g2):
        await patch_group(
            client,
            auth,
            g["id"],
            {"op": "add", "path": "members", "value": [{"value": a}, {"value": b}]},
        )
    r = await client.delete(f"/scim/v2/Users/{a}", headers=auth)
    assert r.status == 204
    assert await members(client, auth, g1["id"]) == [b]
    assert await members(client, auth, g2["id"]) == [b]
    topics = await database.pool.fetch(
        "SELECT topic FROM stored_events WHERE topic NOT LIKE 'domain.request:%'"
        " ORDER BY notification_id DESC LIMIT 3"
    )
    assert sorted(t["topic"] for t in topics) == [
        "domain.group:Group.GroupMembershipChanged",
        "domain.group:Group.GroupMembershipChanged",
        "domain.user:User.UserDeprovisioned",
    ]


async def test_display_name_unique_case_insensitive(client: Client, auth: dict[str, str]) -> None:
    await create_group(client, auth, "Sales")
    r = await client.post(
        "/scim/v2/Groups", headers=headers(auth), json={"schemas": [GROUP], "displayName": "SALES"}
    )
    assert r.status == 409
    assert (await r.json(content_type=None))["scimType"] == "uniqueness"
    other = await create_group(client, auth, "Other")
    body = await patch_group(
        client,
        auth,
        other["id"],
        {"op": "replace", "path": "displayName", "value": "sales"},
        status=409,
    )
    assert body["scimType"] == "uniqueness"


async def test_patch_reply_204_unless_attributes_asked(
    client: Client, auth: dict[str, str]
) -> None:
    group = await create_group(client, auth)
    (a,) = await users(client, auth, 1)
    body = await patch_group(
        client,
        auth,
        group["id"],
        {"op": "add", "path": "members", "value": [{"value": a}]},
        status=200,
        query="?attributes=displayName",
    )
    assert body["displayName"] == "Sales" and "members" not in body
    body = await patch_group(
        client,
        auth,
        group["id"],
        {"op": "replace", "path": "externalId", "value": "ext-1"},
        status=200,
        query="?attributes=members",
    )
    assert [m["value"] for m in body["members"]] == [a]


async def test_put_and_post_with_members(client: Client, auth: dict[str, str]) -> None:
    a, b = await users(client, auth, 2)
    r = await client.post(
        "/scim/v2/Groups",
        headers=headers(auth),
        json={"schemas": [GROUP], "displayName": "WithMembers", "members": [{"value": a}]},
    )
    assert r.status == 201
    group = await r.json(content_type=None)
    assert [m["value"] for m in group["members"]] == [a]
    r = await client.put(
        f"/scim/v2/Groups/{group['id']}",
        headers=headers(auth),
        json={"schemas": [GROUP], "displayName": "Renamed", "members": [{"value": b}]},
    )
    assert r.status == 200
    body = await r.json(content_type=None)
    assert body["displayName"] == "Renamed" and [m["value"] for m in body["members"]] == [b]
