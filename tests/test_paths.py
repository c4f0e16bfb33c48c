"""Paths as real clients write them: any case, a trailing slash, a doubled slash (a tenant URL
ending in `/` joined with `/Users`). The same handler answers, with no redirect; ids keep
their case; `meta.location`, the audit log and the access log keep the canonical path."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from infra.database import Database
from service.scim.paths import canonical_path
from tests.test_audit import audit_auth, settled
from tests.test_entra_users import PATCH_OP, entra_user, headers

Client = TestClient[Any, Any]
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
# How the collection `Users` is spelled by clients we have seen (and by the issue).
SPELLINGS = ["users", "Users/", "/Users", "/users/", "USERS"]


def odd(spelling: str, tail: str = "") -> str:
    """`/scim/v2/` + spelling (+ `/tail`), keeping the spelling's own slashes."""
    path = "/scim/v2/" + spelling
    return path + (tail if path.endswith("/") or not tail else "/" + tail)


@pytest.mark.parametrize("spelling", SPELLINGS)
async def test_every_verb_answers_through_other_spellings(
    client: Client, auth: dict[str, str], spelling: str
) -> None:
    base = f"http://{client.host}:{client.port}/scim/v2"
    name = f"{spelling.strip('/').lower()}.{len(spelling)}@contoso.com"
    r = await client.post(odd(spelling), json=entra_user(name), headers=headers(auth))
    assert r.status == 201, await r.text()
    user = await r.json(content_type=None)
    canonical = f"{base}/Users/{user['id']}"
    assert r.headers["Location"] == user["meta"]["location"] == canonical

    r = await client.get(odd(spelling), params={"filter": f'userName eq "{name}"'}, headers=auth)
    assert r.status == 200, await r.text()
    found = await r.json(content_type=None)
    assert [u["id"] for u in found["Resources"]] == [user["id"]]
    assert found["Resources"][0]["meta"]["location"] == canonical

    for path in (odd(spelling, user["id"]), odd(spelling, user["id"].upper() + "/")):
        r = await client.get(path, headers=auth)
        assert r.status == 200, (path, await r.text())
        assert (await r.json(content_type=None))["meta"]["location"] == canonical

    patch = {
        "schemas": [PATCH_OP],
        "Operations": [{"op": "Replace", "path": "title", "value": "X"}],
    }
    r = await client.patch(odd(spelling, user["id"]), json=patch, headers=headers(auth))
    assert r.status == 200, await r.text()
    assert (await r.json(content_type=None))["title"] == "X"

    replaced = {**entra_user(name), "title": "Y"}
    r = await client.put(odd(spelling, user["id"] + "/"), json=replaced, headers=headers(auth))
    assert r.status == 200, await r.text()
    assert (await r.json(content_type=None))["title"] == "Y"

    search = {"filter": f'userName eq "{name}"'}
    r = await client.post(odd(spelling, ".SEARCH"), json=search, headers=headers(auth))
    assert r.status == 200, await r.text()
    assert (await r.json(content_type=None))["totalResults"] == 1

    r = await client.delete(odd(spelling, user["id"]), headers=auth)
    assert r.status == 204, await r.text()
    r = await client.get(f"/scim/v2/Users/{user['id']}", headers=auth)
    assert r.status == 404


async def test_groups_and_discovery_answer_through_other_spellings(
    client: Client, auth: dict[str, str]
) -> None:
    body = {"schemas": [GROUP_SCHEMA], "displayName": "Sales"}
    r = await client.post("/scim/v2//groups/", json=body, headers=headers(auth))
    assert r.status == 201, await r.text()
    group = await r.json(content_type=None)
    assert r.headers["Location"].endswith(f"/scim/v2/Groups/{group['id']}")
    patch = {
        "schemas": [PATCH_OP],
        "Operations": [{"op": "Replace", "path": "displayName", "value": "Sales EMEA"}],
    }
    r = await client.patch(f"/scim/v2/GROUPS//{group['id']}/", json=patch, headers=headers(auth))
    assert r.status == 204, await r.text()
    r = await client.get("/scim/v2/Groups/", params={"filter": 'displayName eq "Sales EMEA"'})
    assert r.status == 401  # still behind the token
    r = await client.get(
        "/scim/v2/Groups/", params={"filter": 'displayName eq "Sales EMEA"'}, headers=auth
    )
    assert [g["id"] for g in (await r.json(content_type=None))["Resources"]] == [group["id"]]

    for path in (
        "/scim/v2/serviceproviderconfig",
        "/scim/v2//ServiceProviderConfig/",
        "/scim/v2/resourcetypes/",
        "/scim/v2/RESOURCETYPES/User",
        "/scim/v2/schemas/" + USER_SCHEMA + "/",
        "/SCIM/V2/Schemas",
    ):
        r = await client.get(path, headers=auth)
        assert r.status == 200, (path, await r.text())

    # Ids keep their case; unknown endpoints and extra segments stay 404; no redirects.
    for path in (
        "/scim/v2/schemas/" + USER_SCHEMA.upper(),
        "/scim/v2/ResourceTypes/user",
        "/scim/v2/userz",
        "/scim/v2/Users/a/b",
        "/scim/v2/ServiceProviderConfig/x",
        "/scim/v2/.search/x",
        "/scim/v3/Users",
        "/audit//v1/entries",
    ):
        r = await client.get(path, headers=auth, allow_redirects=False)
        assert r.status == 404, (path, r.status)
    r = await client.delete("/scim/v2/users/", headers=auth)
    assert r.status == 405


async def test_the_canonical_path_is_what_auth_and_the_audit_log_see(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    reader = await audit_auth(database)
    # The role check reads the canonical path: an audit token is no key to SCIM.
    r = await client.get("/SCIM/v2//users", headers=reader)
    assert r.status == 403
    r = await client.post("/scim/v2/users/", json=entra_user("a@contoso.com"), headers=auth)
    assert r.status == 201
    user = await r.json(content_type=None)
    entries = (await settled(client, reader))["entries"]
    assert [(e["request"]["path"], e["targetIdentity"]["id"]) for e in entries] == [
        ("/scim/v2/Users", user["id"])
    ]


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/scim/v2/Users", None),
        ("/scim/v2/Users/AbC", None),
        ("/scim/v2/users/AbC/", "/scim/v2/Users/AbC"),
        ("/scim/v2//Users", "/scim/v2/Users"),
        ("//scim/v2/Users", "/scim/v2/Users"),
        ("/scim/v2/groups/.Search", "/scim/v2/Groups/.search"),
        ("/scim/v2/.SEARCH", "/scim/v2/.search"),
        ("/scim/v2/Users/a%2Fb/", "/scim/v2/Users/a%2Fb"),
        ("/scim/v2/Users/a/b", None),
        ("/scim/v2/ServiceProviderConfig/x", None),
        ("/scim/v2/.search/x", None),
        ("/scim/v2/", None),
        ("/scim/v2/Bulk", None),
        ("/audit//v1/entries", None),
        ("/healthz/", None),
        ("/scim/v2/Users" + "/" * 10_000 + "x" * 10_000, "/scim/v2/Users/" + "x" * 10_000),
    ],
)
def test_canonical_path(raw: str, canonical: str | None) -> None:
    assert canonical_path(raw) == canonical
