"""What one request may cost: values per multi-valued attribute, characters per string, the
work of one PATCH and the size of a user. Each limit answers 400 with a SCIM Error and writes
nothing; the limit itself is accepted, and announced in /ServiceProviderConfig.

Speed is not asserted here (bench/cost.py measures it, `make fuzz` checks the CPU of each
request); these tests pin the behaviour the linear code paths must keep.
"""

from __future__ import annotations

from typing import Any

from domain.schema import normalise_user
from infra.config import Settings
from infra.database import Database
from service.scim.patch import MAX_PATCH_COST, apply_patch, parse_patch_request
from tests import test_limits
from tests.test_entra_groups import PATCH_OP, create_group, members
from tests.test_entra_users import ENTERPRISE, entra_user, event_count, get_user, headers
from tests.test_limits import Client, MakeClient, scim_error

DEFAULTS = Settings()
make_client = test_limits.make_client  # the fixture: a server with some settings changed


def values(attribute: str, n: int, start: int = 0) -> list[dict[str, Any]]:
    if attribute == "addresses":
        return [{"type": "work", "streetAddress": f"{i} Main St"} for i in range(start, n)]
    return [{"type": "work", "value": f"v{i}@contoso.com"} for i in range(start, n)]


async def create(
    client: Client, auth: dict[str, str], user_name: str = "u@contoso.com", **attributes: Any
) -> dict[str, Any]:
    body = entra_user(user_name) | attributes
    r = await client.post("/scim/v2/Users", json=body, headers=headers(auth))
    assert r.status == 201, await r.text()
    return dict(await r.json(content_type=None))


def op(path: str | None, value: Any, kind: str = "add") -> dict[str, Any]:
    return {"op": kind, "value": value} | ({"path": path} if path else {})


def patch_body(*ops: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": list(ops)}


def _descriptions(schemas: dict[str, Any]) -> dict[str, str]:
    """Attribute path -> description, over every schema /Schemas lists."""
    out: dict[str, str] = {}
    for schema in schemas["Resources"]:
        for attribute in schema["attributes"]:
            out[attribute["name"]] = attribute.get("description", "")
            for sub in attribute.get("subAttributes", []):
                out[f"{attribute['name']}.{sub['name']}"] = sub.get("description", "")
    return out


async def test_limits_are_settings_and_announced_in_the_schemas(
    client: Client, make_client: MakeClient, auth: dict[str, str], monkeypatch: Any
) -> None:
    assert (DEFAULTS.max_multi_values, DEFAULTS.max_string_length) == (1000, 65536)
    monkeypatch.setenv("SCIMLEDGER_MAX_MULTI_VALUES", "7")
    monkeypatch.setenv("SCIMLEDGER_MAX_STRING_LENGTH", "99")
    assert (Settings().max_multi_values, Settings().max_string_length) == (7, 99)

    # RFC 7643 has no structured place for them (and strict clients refuse a
    # ServiceProviderConfig extension): each writable attribute's description says its limit.
    r = await client.get("/scim/v2/Schemas", headers=auth)
    said = _descriptions(await r.json(content_type=None))
    assert said["emails"].endswith("At most 1000 values.")
    assert said["x509Certificates"].endswith("At most 1000 values.")
    assert said["userName"].endswith("At most 65536 characters.")
    assert said["emails.value"].endswith("At most 65536 characters.")
    assert said["employeeNumber"].endswith("At most 65536 characters.")
    assert "At most 10000 members in a POST or PUT body" in said["members"]
    assert "At most" not in said["groups"]  # read-only: nothing to refuse

    small = await make_client(max_multi_values=7, max_string_length=99)
    r = await small.get("/scim/v2/Schemas", headers=auth)
    said = _descriptions(await r.json(content_type=None))
    assert said["roles"].endswith("At most 7 values.")
    assert said["displayName"].endswith("At most 99 characters.")


async def test_multi_valued_attributes_are_capped_and_the_cap_is_accepted(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    n = DEFAULTS.max_multi_values
    # One over the cap, on every verb that writes values: 400 invalidValue, nothing written.
    # (Before the cap, 20,000 emails took 9 s of CPU to de-duplicate, value by value.)
    for attribute in ("emails", "roles", "x509Certificates", "addresses"):
        user = entra_user(f"{attribute}@contoso.com") | {attribute: values(attribute, n + 1)}
        r = await client.post("/scim/v2/Users", json=user, headers=headers(auth))
        detail = (await scim_error(r, 400, "invalidValue"))["detail"]
        assert f"{attribute} may hold at most {n} values" in detail
    assert await event_count(database) == 0

    # The cap itself: accepted, every value kept in the client's order.
    created = await create(client, auth, "full@contoso.com", emails=values("emails", n))
    stored = await get_user(client, auth, created["id"])
    assert [e["value"] for e in stored["emails"]] == [e["value"] for e in values("emails", n)]
    path = f"/scim/v2/Users/{created['id']}"
    before = await event_count(database)

    refused = [
        ("PUT", {**stored, "emails": values("emails", n + 1)}),
        ("PATCH", patch_body(op("emails", values("emails", n + 1, n)))),  # grows it past n
        ("PATCH", patch_body(op("roles", values("roles", n + 1)))),  # lists n + 1 at once
        ("PATCH", patch_body(op(None, {"emails": values("emails", n + 1)}, "replace"))),
        ("PATCH", patch_body(op('emails[value eq "new@contoso.com"].value', "new@contoso.com"))),
    ]
    for method, body in refused:
        r = await client.request(method, path, json=body, headers=headers(auth))
        await scim_error(r, 400, "invalidValue")
    assert await event_count(database) == before

    # A repeat is no growth (the same value, sub-attributes in another order), and Entra's
    # remove-by-value takes all of them at once: linear in the values on both sides.
    same = [{"value": e["value"], "type": "work"} for e in values("emails", n)]
    r = await client.patch(path, json=patch_body(op("emails", same)), headers=headers(auth))
    assert r.status == 200, await r.text()
    assert await event_count(database) == before  # no change: no event
    gone = [{"value": e["value"].upper()} for e in values("emails", n)[1:]]
    r = await client.patch(
        path, json=patch_body(op("emails", gone, "remove")), headers=headers(auth)
    )
    assert r.status == 200, await r.text()
    assert [e["value"] for e in (await r.json(content_type=None))["emails"]] == ["v0@contoso.com"]


def test_repeated_values_are_dropped_in_one_pass_keeping_the_first() -> None:
    raw = [{"value": f"v{i % 500}", "type": "work"} for i in range(1500)]
    raw += [{"type": "work", "value": "v1"}, {"value": "v1"}]
    state = normalise_user({"userName": "a", "emails": raw})
    assert [e["value"] for e in state["emails"]] == [f"v{i}" for i in range(500)] + ["v1"]

    document = {"schemas": [], "userName": "a", "roles": [{"value": "r0"}, {"value": "r1"}]}
    patched = apply_patch(
        document,
        parse_patch_request(
            patch_body(op("roles", [{"value": f"r{i % 3}"} for i in range(999)] * 1))
        ),
        max_values=DEFAULTS.max_multi_values,
    )
    assert patched["roles"] == [{"value": "r0"}, {"value": "r1"}, {"value": "r2"}]


async def test_patch_work_is_bounded_and_writes_nothing_past_it(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    n = DEFAULTS.max_multi_values
    created = await create(client, auth, emails=values("emails", n))
    path = f"/scim/v2/Users/{created['id']}"
    before = await event_count(database)

    def filtered(count: int) -> dict[str, Any]:
        ops = [
            op(f'emails[value eq "v{i}@contoso.com"].display', f"d{i}", "replace")
            for i in range(count)
        ]
        return patch_body(*ops)

    # Each operation matches its filter against all n values: too costly past MAX_PATCH_COST.
    r = await client.patch(path, json=filtered(MAX_PATCH_COST // n + 1), headers=headers(auth))
    assert "too costly" in (await scim_error(r, 400, "invalidValue"))["detail"]
    assert await event_count(database) == before
    # Within it (the paths cost their length too): applied.
    r = await client.patch(path, json=filtered(MAX_PATCH_COST // (n + 200)), headers=headers(auth))
    assert r.status == 200, await r.text()
    assert (await r.json(content_type=None))["emails"][0]["display"] == "d0"

    # Paths: as long and as deep as filters may be, no more (400 invalidPath).
    long_path = 'emails[value eq "' + "a" * 1024 + '"].display'
    deep_path = "emails[" + "(" * 33 + 'value eq "a"' + ")" * 33 + "].display"
    before = await event_count(database)
    for bad in (long_path, deep_path):
        r = await client.patch(path, json=patch_body(op(bad, "x")), headers=headers(auth))
        await scim_error(r, 400, "invalidPath")
    assert await event_count(database) == before


async def test_string_length_is_capped_in_every_body(
    client: Client, make_client: MakeClient, auth: dict[str, str], database: Database
) -> None:
    # The default takes an x509 certificate of several KB, and refuses past 65,536 characters.
    certificate = [{"value": "MIIC" + "A" * 8000}]
    created = await create(client, auth, x509Certificates=certificate)
    assert created["x509Certificates"] == certificate
    r = await client.post(
        "/scim/v2/Users",
        json=entra_user("long@contoso.com") | {"displayName": "x" * 65537},
        headers=headers(auth),
    )
    assert "65537 characters" in (await scim_error(r, 400, "invalidValue"))["detail"]

    small = await make_client(max_string_length=100)
    user = await create(small, auth, "small@contoso.com", displayName="x" * 100)
    group = await create_group(small, auth)
    before = await event_count(database)
    long = "y" * 101
    refused: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/scim/v2/Users", entra_user("a@contoso.com") | {"title": long}),
        ("POST", "/scim/v2/Users", entra_user("b@contoso.com") | {long: "a name"}),
        ("PUT", f"/scim/v2/Users/{user['id']}", entra_user("small@contoso.com") | {"title": long}),
        ("PATCH", f"/scim/v2/Users/{user['id']}", patch_body(op("title", long))),
        ("PATCH", f"/scim/v2/Users/{user['id']}", patch_body(op("emails", [{"value": long}]))),
        ("PATCH", f"/scim/v2/Users/{user['id']}", patch_body(op(f"emails[{long}]", "x"))),
        ("POST", "/scim/v2/Groups", {"displayName": long}),
        ("PATCH", f"/scim/v2/Groups/{group['id']}", patch_body(op("members", [{"value": long}]))),
        ("POST", "/scim/v2/Users/.search", {"filter": f'userName eq "{long}"'}),
    ]
    for method, path, body in refused:
        r = await small.request(method, path, json=body, headers=headers(auth))
        await scim_error(r, 400, "invalidValue")
    assert await event_count(database) == before
    assert (await get_user(small, auth, user["id"]))["displayName"] == "x" * 100


async def test_deep_or_container_heavy_bodies_are_refused_before_any_work(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    deep = entra_user("deep@contoso.com") | {"roles": [{"value": "r", "x": [[["y"]]]}]}
    for _ in range(32):
        deep = {"schemas": deep["schemas"], "userName": "deep@contoso.com", "nested": deep}
    r = await client.post("/scim/v2/Users", json=deep, headers=headers(auth))
    assert "nested deeper than 32" in (await scim_error(r, 400, "invalidValue"))["detail"]
    # 2 MiB of `[[[...]]]` (valid JSON, 1000 deep) would take half a second to build as lists.
    nested = b"[" * 1000 + b"]" * 1000
    body = b'{"userName": "lists@contoso.com", "roles": [' + b",".join([nested] * 1000) + b"]}"
    r = await client.post("/scim/v2/Users", data=body, headers=headers(auth))
    assert "objects and arrays" in (await scim_error(r, 400, "invalidValue"))["detail"]
    assert await event_count(database) == 0
    # As deep as SCIM goes: the enterprise manager in a PATCH without a path.
    user = await create(client, auth, "shallow@contoso.com")
    manager = await create(client, auth, "boss@contoso.com")
    value = {ENTERPRISE: {"manager": {"value": manager["id"]}}}
    r = await client.patch(
        f"/scim/v2/Users/{user['id']}",
        json=patch_body(op(None, value, "replace")),
        headers=headers(auth),
    )
    assert r.status == 200, await r.text()


async def test_patch_cannot_grow_a_user_past_what_one_body_carries(
    make_client: MakeClient, auth: dict[str, str], database: Database
) -> None:
    small = await make_client(max_body_bytes=4096)
    user = await create(small, auth, "grow@contoso.com")
    path = f"/scim/v2/Users/{user['id']}"
    r = await small.patch(path, json=patch_body(op("title", "t" * 2500)), headers=headers(auth))
    assert r.status == 200, await r.text()
    before = await event_count(database)
    r = await small.patch(
        path, json=patch_body(op("displayName", "d" * 2500)), headers=headers(auth)
    )
    assert "more than a request body" in (await scim_error(r, 400, "invalidValue"))["detail"]
    assert await event_count(database) == before
    assert (await get_user(small, auth, user["id"])).get("displayName") is None


async def test_group_members_are_capped_and_repeats_are_one_each(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    ids = [(await create(client, auth, f"m{i}@contoso.com"))["id"] for i in range(3)]
    n = DEFAULTS.max_patch_members  # a POST or PUT names members as one PATCH operation may
    before = await event_count(database)
    body = {"displayName": "Many", "members": [{"value": ids[i % 3]} for i in range(n + 1)]}
    r = await client.post("/scim/v2/Groups", json=body, headers=headers(auth))
    assert f"may name at most {n} members" in (await scim_error(r, 400, "invalidValue"))["detail"]
    assert await event_count(database) == before
    body["members"] = body["members"][:n]
    r = await client.post("/scim/v2/Groups", json=body, headers=headers(auth))
    assert r.status == 201, await r.text()
    group = await r.json(content_type=None)
    assert await members(client, auth, group["id"]) == sorted(ids)
    r = await client.put(
        f"/scim/v2/Groups/{group['id']}",
        json={"displayName": "Many", "members": [{"value": ids[0]}] * (n + 1)},
        headers=headers(auth),
    )
    await scim_error(r, 400, "invalidValue")
    assert await members(client, auth, group["id"]) == sorted(ids)
    again = [{"value": ids[i % 3]} for i in range(n)]
    before = await event_count(database)
    r = await client.patch(
        f"/scim/v2/Groups/{group['id']}",
        json=patch_body(*[op("members", again, kind) for kind in ("remove", "add")]),
        headers=headers(auth),
    )
    assert r.status == 204, await r.text()
    assert await members(client, auth, group["id"]) == sorted(ids)
    assert await event_count(database) == before  # no change: no event
