"""Entra ID's user requests from ENTRA.md, replayed end to end over HTTP against PostgreSQL."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from infra.database import Database

Client = TestClient[Any, Any]
SCIM = "application/scim+json"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


# ENTRA.md's POST /Users body (the benchmark sends it too).
ENTRA_USER = json.loads((Path(__file__).parent / "fixtures" / "entra_user.json").read_text())


def entra_user(
    user_name: str = "Test_User@contoso.com", external_id: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = copy.deepcopy(ENTRA_USER)
    body.update(externalId=external_id or str(uuid.uuid4()), userName=user_name)
    body["emails"][0]["value"] = user_name
    return body


def headers(auth: dict[str, str]) -> dict[str, str]:
    return {**auth, "Content-Type": SCIM}


async def event_count(database: Database) -> int:
    """Domain events only: every write request also records its outcome (the audit log's)."""
    return int(
        await database.pool.fetchval(
            "SELECT count(*) FROM stored_events WHERE topic NOT LIKE 'domain.request:%'"
        )
    )


async def create(client: Client, auth: dict[str, str], **kw: Any) -> dict[str, Any]:
    r = await client.post("/scim/v2/Users", json=entra_user(**kw), headers=headers(auth))
    assert r.status == 201, await r.text()
    return dict(await r.json(content_type=None))


async def patch(
    client: Client, auth: dict[str, str], user_id: str, *ops: dict[str, Any], status: int = 200
) -> dict[str, Any]:
    r = await client.patch(
        f"/scim/v2/Users/{user_id}",
        json={"schemas": [PATCH_OP], "Operations": list(ops)},
        headers=headers(auth),
    )
    assert r.status == status, await r.text()
    assert r.headers["Content-Type"].startswith(SCIM)
    return dict(await r.json(content_type=None))


async def get_user(client: Client, auth: dict[str, str], user_id: str) -> dict[str, Any]:
    r = await client.get(f"/scim/v2/Users/{user_id}", headers=auth)
    assert r.status == 200, await r.text()
    return dict(await r.json(content_type=None))


async def find(client: Client, auth: dict[str, str], query: str) -> dict[str, Any]:
    r = await client.get(f"/scim/v2/Users?{query}", headers=auth, skip_auto_headers=["User-Agent"])
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith(SCIM)
    return dict(await r.json(content_type=None))


async def test_test_connection_gets_an_empty_list(client: Client, auth: dict[str, str]) -> None:
    probe = uuid.uuid4()
    body = await find(client, auth, f"aadOptscim062020&filter=userName+eq+%22{probe}%22")
    assert body == {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
        "totalResults": 0,
        "itemsPerPage": 0,
        "startIndex": 1,
        "Resources": [],
    }


async def test_create_returns_the_whole_resource(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    r = await client.post(
        "/scim/v2/Users?aadOptscim062020",
        json=entra_user(),
        headers=headers(auth),
        skip_auto_headers=["User-Agent"],
    )
    assert r.status == 201
    assert r.headers["Content-Type"].startswith(SCIM)
    body = await r.json(content_type=None)
    uuid.UUID(body["id"])
    assert r.headers["Location"] == body["meta"]["location"]
    assert body["meta"]["location"].endswith(f"/scim/v2/Users/{body['id']}")
    assert body["meta"]["resourceType"] == "User"
    assert body["meta"]["version"] == 'W/"1"' == r.headers["ETag"]
    assert body["meta"]["created"] == body["meta"]["lastModified"]
    assert body["userName"] == "Test_User@contoso.com"
    assert body["active"] is True
    assert body["emails"] == [{"primary": True, "type": "work", "value": "Test_User@contoso.com"}]
    assert body["name"]["givenName"] == "givenName"
    assert "addresses" not in body and "roles" not in body  # null and [] mean absent
    assert await event_count(database) == 1
    assert await get_user(client, auth, body["id"]) == body


async def test_match_by_username_in_any_case_external_id_and_work_email(
    client: Client, auth: dict[str, str]
) -> None:
    user = await create(client, auth, external_id="0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef")
    for query in (
        "filter=userName+eq+%22test_user%40CONTOSO.com%22",
        'filter=userName eq "TEST_USER@contoso.com"',
        "filter=externalId+eq+%220a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef%22",
        'filter=emails[type eq "work"].value eq "test_user@contoso.com"',
        'filter=USERNAME EQ "Test_User@contoso.com" and active eq true',
    ):
        body = await find(client, auth, query)
        assert body["totalResults"] == 1, query
        assert body["Resources"][0]["id"] == user["id"]
    # externalId is caseExact
    body = await find(client, auth, 'filter=externalId eq "0A21F0F2-8D2A-4F8E-BF98-7363C4AED4EF"')
    assert body["totalResults"] == 0


async def test_duplicate_username_is_409_and_appends_nothing(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    await create(client, auth)
    before = await event_count(database)
    r = await client.post(
        "/scim/v2/Users", json=entra_user("TEST_USER@contoso.com"), headers=headers(auth)
    )
    assert r.status == 409
    body = await r.json(content_type=None)
    assert body["scimType"] == "uniqueness" and body["status"] == "409"
    assert body["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    assert await event_count(database) == before


async def test_default_style_patch(client: Client, auth: dict[str, str]) -> None:
    user = await create(client, auth)
    body = await patch(
        client,
        auth,
        user["id"],
        {"op": "Replace", "path": 'emails[type eq "work"].value', "value": "new@contoso.com"},
        {"op": "Replace", "path": "name.GivenName", "value": "Barbara"},
        {"op": "Add", "path": "nickName", "value": "Babs"},
        {"op": "Add", "path": f"{ENTERPRISE}:employeeNumber", "value": "701984"},
        {"op": "Replace", "path": "displayName", "value": "Barbara Jensen"},
    )
    assert body["emails"] == [{"primary": True, "type": "work", "value": "new@contoso.com"}]
    assert body["name"]["givenName"] == "Barbara"
    assert body["nickName"] == "Babs"
    assert body["displayName"] == "Barbara Jensen"
    assert body[ENTERPRISE]["employeeNumber"] == "701984"
    # EmailChanged, NameChanged, and one UserAttributesChanged for the other three.
    assert body["meta"]["version"] == 'W/"4"'
    assert await get_user(client, auth, user["id"]) == body


async def test_replace_work_email_creates_it_when_missing(
    client: Client, auth: dict[str, str]
) -> None:
    payload = entra_user("nomail@contoso.com")
    payload["emails"] = [{"type": "home", "value": "me@home.example"}]
    r = await client.post("/scim/v2/Users", json=payload, headers=headers(auth))
    user = await r.json(content_type=None)
    body = await patch(
        client,
        auth,
        user["id"],
        {"op": "Replace", "path": 'emails[type eq "work"].value', "value": "work@contoso.com"},
    )
    assert {"type": "work", "value": "work@contoso.com"} in body["emails"]
    assert {"type": "home", "value": "me@home.example"} in body["emails"]
    found = await find(client, auth, 'filter=emails[type eq "work"].value eq "work@contoso.com"')
    assert found["totalResults"] == 1


async def test_aad_opt_style_patch_with_dotted_and_urn_keys(
    client: Client, auth: dict[str, str]
) -> None:
    user = await create(client, auth)
    body = await patch(
        client,
        auth,
        user["id"],
        {
            "op": "replace",
            "value": {
                "displayName": "B",
                "name.givenName": "K",
                "name.familyName": "U",
                f"{ENTERPRISE}:employeeNumber": "A1",
                "active": False,
            },
        },
    )
    assert body["displayName"] == "B"
    assert body["name"]["givenName"] == "K" and body["name"]["familyName"] == "U"
    assert body[ENTERPRISE]["employeeNumber"] == "A1"
    assert body["active"] is False


async def test_manager_set_change_and_remove_in_every_form(
    client: Client, auth: dict[str, str]
) -> None:
    boss = await create(client, auth, user_name="boss@contoso.com")
    boss2 = await create(client, auth, user_name="boss2@contoso.com")
    user = await create(client, auth)
    body = await patch(
        client,
        auth,
        user["id"],
        {
            "op": "Add",
            "path": "manager",
            "value": [{"$ref": f"http://x/scim/v2/Users/{boss['id']}", "value": boss["id"]}],
        },
    )
    assert body[ENTERPRISE]["manager"]["value"] == boss["id"]
    body = await patch(
        client,
        auth,
        user["id"],
        {"op": "add", "path": f"{ENTERPRISE}:manager", "value": boss2["id"]},
    )
    assert body[ENTERPRISE]["manager"]["value"] == boss2["id"]
    found = await find(client, auth, f'filter={ENTERPRISE}:manager.value eq "{boss2["id"]}"')
    assert [u["id"] for u in found["Resources"]] == [user["id"]]
    body = await patch(client, auth, user["id"], {"op": "Remove", "path": f"{ENTERPRISE}:manager"})
    assert "manager" not in body.get(ENTERPRISE, {})
    await patch(
        client,
        auth,
        user["id"],
        {"op": "add", "path": f"{ENTERPRISE}:manager", "value": boss["id"]},
    )
    body = await patch(
        client, auth, user["id"], {"op": "remove", "path": f'manager[value eq "{boss["id"]}"]'}
    )
    assert "manager" not in body.get(ENTERPRISE, {})
    # A manager that is not a user of this tenant is refused, and nothing changes.
    bad = await patch(
        client,
        auth,
        user["id"],
        {"op": "add", "path": f"{ENTERPRISE}:manager", "value": str(uuid.uuid4())},
        status=400,
    )
    assert bad["scimType"] == "invalidValue"


async def test_disable_with_string_false_then_reenable(
    client: Client, auth: dict[str, str]
) -> None:
    user = await create(client, auth)
    body = await patch(
        client, auth, user["id"], {"op": "Replace", "path": "active", "value": "False"}
    )
    assert body["active"] is False
    assert (await get_user(client, auth, user["id"]))["active"] is False
    found = await find(client, auth, 'filter=userName eq "Test_User@contoso.com"')
    assert found["totalResults"] == 1 and found["Resources"][0]["active"] is False
    body = await patch(
        client, auth, user["id"], {"op": "Replace", "path": "active", "value": "True"}
    )
    assert body["active"] is True


async def test_unchanged_patches_append_nothing(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    user = await create(client, auth)
    before = await event_count(database)
    await patch(client, auth, user["id"])  # empty Operations (the SCIM Validator sends it)
    body = await patch(
        client,
        auth,
        user["id"],
        {"op": "Replace", "path": "active", "value": "True"},
        {"op": "Replace", "path": "userName", "value": "Test_User@contoso.com"},
    )
    assert body["meta"]["version"] == 'W/"1"'
    assert await event_count(database) == before


async def test_replace_with_empty_string_or_null_clears(
    client: Client, auth: dict[str, str]
) -> None:
    user = await create(client, auth)
    await patch(
        client,
        auth,
        user["id"],
        {"op": "Add", "path": "nickName", "value": "Babs"},
        {"op": "Add", "path": "title", "value": "Boss"},
    )
    body = await patch(
        client,
        auth,
        user["id"],
        {"op": "Replace", "path": "nickName", "value": ""},
        {"op": "Replace", "path": "title", "value": None},
    )
    assert "nickName" not in body and "title" not in body


async def test_an_invalid_operation_applies_nothing(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    user = await create(client, auth)
    before = await event_count(database)
    body = await patch(
        client,
        auth,
        user["id"],
        {"op": "Replace", "path": "displayName", "value": "Changed"},
        {"op": "Replace", "path": "noSuchAttribute", "value": "x"},
        status=400,
    )
    assert body["scimType"] in ("invalidPath", "noTarget")
    assert "displayName" not in await get_user(client, auth, user["id"])
    assert await event_count(database) == before


async def test_delete_then_404_everywhere(client: Client, auth: dict[str, str]) -> None:
    user = await create(client, auth)
    r = await client.delete(f"/scim/v2/Users/{user['id']}", headers=auth)
    assert r.status == 204
    for method in ("GET", "DELETE", "PATCH", "PUT"):
        r = await client.request(
            method,
            f"/scim/v2/Users/{user['id']}",
            headers=headers(auth),
            json={"schemas": [PATCH_OP], "Operations": []}
            if method == "PATCH"
            else entra_user()
            if method == "PUT"
            else None,
        )
        assert r.status == 404, method
        body = await r.json(content_type=None)
        assert body["status"] == "404" and r.headers["Content-Type"].startswith(SCIM)
    found = await find(client, auth, 'filter=userName eq "Test_User@contoso.com"')
    assert found["totalResults"] == 0
    # The userName is free again.
    await create(client, auth)
    for unknown in (str(uuid.uuid4()), "not-a-uuid"):
        r = await client.delete(f"/scim/v2/Users/{unknown}", headers=auth)
        assert r.status == 404


async def test_put_replaces_the_user(client: Client, auth: dict[str, str]) -> None:
    user = await create(client, auth)
    payload = entra_user()
    payload["name"] = {"givenName": "New"}
    payload["active"] = "False"
    r = await client.put(f"/scim/v2/Users/{user['id']}", json=payload, headers=headers(auth))
    assert r.status == 200
    body = await r.json(content_type=None)
    assert body["name"] == {"givenName": "New"} and body["active"] is False
    assert body["id"] == user["id"] and body["meta"]["created"] == user["meta"]["created"]


async def test_bad_bodies_are_400_and_write_nothing(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    cases = [
        (b"{not json", "invalidSyntax"),
        (b"[]", "invalidSyntax"),
        (b'{"schemas": [], "active": true}', "invalidValue"),  # no userName
        (b'{"userName": 42}', "invalidValue"),
        (b'{"userName": "x@y", "emails": "x@y"}', "invalidValue"),
        (b'{"userName": "x@y", "active": "maybe"}', "invalidValue"),
    ]
    for raw, scim_type in cases:
        r = await client.post("/scim/v2/Users", data=raw, headers=headers(auth))
        assert r.status == 400, raw
        body = await r.json(content_type=None)
        assert body["scimType"] == scim_type, (raw, body)
    assert await event_count(database) == 0


async def test_paging_like_the_scim_validator(client: Client, auth: dict[str, str]) -> None:
    ids = [(await create(client, auth, user_name=f"u{i:02}@contoso.com"))["id"] for i in range(12)]
    seen: list[str] = []
    for start in (1, 6, 11):
        body = await find(client, auth, f"startIndex={start}&count=5")
        assert body["totalResults"] == 12
        assert body["startIndex"] == start
        assert body["itemsPerPage"] == len(body["Resources"]) == min(5, 12 - start + 1)
        seen += [u["id"] for u in body["Resources"]]
    assert seen == ids
    body = await find(client, auth, "count=0")
    assert body["totalResults"] == 12 and body["Resources"] == []
    # Cursor pagination (RFC 9865) walks the same users once each.
    walked: list[str] = []
    cursor = ""
    while True:
        body = await find(client, auth, f"count=5&cursor={cursor}")
        walked += [u["id"] for u in body["Resources"]]
        if "nextCursor" not in body:
            break
        cursor = body["nextCursor"]
    assert walked == ids
    r = await client.get("/scim/v2/Users?cursor=garbage!&count=5", headers=auth)
    assert r.status == 400 and (await r.json(content_type=None))["scimType"] == "invalidCursor"
    # sortBy
    body = await find(client, auth, "sortBy=userName&sortOrder=descending&count=3")
    assert [u["userName"] for u in body["Resources"]] == [
        "u11@contoso.com",
        "u10@contoso.com",
        "u09@contoso.com",
    ]


async def test_search_endpoint_and_attribute_selection(
    client: Client, auth: dict[str, str]
) -> None:
    user = await create(client, auth)
    r = await client.post(
        "/scim/v2/Users/.search",
        headers=headers(auth),
        json={
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
            "filter": 'userName eq "test_user@contoso.com"',
            "attributes": ["userName"],
        },
    )
    assert r.status == 200
    body = await r.json(content_type=None)
    assert body["totalResults"] == 1
    resource = body["Resources"][0]
    assert resource["id"] == user["id"] and resource["userName"] == "Test_User@contoso.com"
    assert "emails" not in resource and "name" not in resource
    one = await find(client, auth, "excludedAttributes=emails,name&filter=userName pr")
    assert "emails" not in one["Resources"][0] and "userName" in one["Resources"][0]


async def test_invalid_filters_are_400_invalid_filter(client: Client, auth: dict[str, str]) -> None:
    for f in ("userName eq", 'noSuchThing eq "x"', '(userName eq "x"', 'userName zz "x"'):
        r = await client.get("/scim/v2/Users", params={"filter": f}, headers=auth)
        assert r.status == 400, f
        assert (await r.json(content_type=None))["scimType"] == "invalidFilter"


async def test_etags(client: Client, auth: dict[str, str], database: Database) -> None:
    user = await create(client, auth)
    r = await client.get(f"/scim/v2/Users/{user['id']}", headers={**auth, "If-None-Match": 'W/"1"'})
    assert r.status == 304
    before = await event_count(database)
    r = await client.patch(
        f"/scim/v2/Users/{user['id']}",
        headers={**headers(auth), "If-Match": 'W/"7"'},
        json={
            "schemas": [PATCH_OP],
            "Operations": [{"op": "replace", "path": "title", "value": "x"}],
        },
    )
    assert r.status == 412
    assert await event_count(database) == before
    r = await client.patch(
        f"/scim/v2/Users/{user['id']}",
        headers={**headers(auth), "If-Match": 'W/"1"'},
        json={
            "schemas": [PATCH_OP],
            "Operations": [{"op": "replace", "path": "title", "value": "x"}],
        },
    )
    assert r.status == 200 and r.headers["ETag"] == 'W/"2"'
    r = await client.delete(f"/scim/v2/Users/{user['id']}", headers={**auth, "If-Match": 'W/"1"'})
    assert r.status == 412


async def test_events_carry_the_request_id(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    r = await client.post(
        "/scim/v2/Users",
        json=entra_user(),
        headers={**headers(auth), "X-Request-Id": "entra-change-1"},
    )
    assert r.status == 201
    request_id = r.headers["X-Request-Id"]  # the service's own, not the client's
    rows = await database.pool.fetch(
        "SELECT topic, request_id FROM stored_events ORDER BY notification_id"
    )
    assert [(r["topic"], r["request_id"]) for r in rows] == [
        ("domain.user:User.UserProvisioned", request_id),
        ("domain.request:ProvisioningRequest.RequestRecorded", request_id),
    ]
