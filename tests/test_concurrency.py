"""16 clients writing one user and one group at once: no update is lost.

Without If-Match the service retries a write that lost a version race, so every client's
change lands. With If-Match a client whose version is stale gets 412 and writes nothing; the
writes that got a 2xx are all in the final state.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient

from infra.database import Database
from tests.test_entra_groups import GROUP
from tests.test_entra_users import PATCH_OP, create, get_user, headers

Client = TestClient[Any, Any]
CLIENTS = 16
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"


def ops(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": list(operations)}


async def _patch(
    client: Client, auth: dict[str, str], path: str, body: dict[str, Any], **extra: str
) -> tuple[int, Any, str]:
    r = await client.patch(path, json=body, headers={**headers(auth), **extra})
    text = await r.text()
    return r.status, (await r.json(content_type=None)) if text else None, r.headers.get("ETag", "")


async def _domain_events_of(database: Database, request_ids: list[str]) -> int:
    return int(
        await database.pool.fetchval(
            "SELECT count(*) FROM stored_events WHERE request_id = any($1::text[])"
            " AND topic NOT LIKE 'domain.request:%'",
            request_ids,
        )
    )


async def _new_group(client: Client, auth: dict[str, str], name: str) -> dict[str, Any]:
    r = await client.post(
        "/scim/v2/Groups", json={"schemas": [GROUP], "displayName": name}, headers=headers(auth)
    )
    assert r.status == 201, await r.text()
    return dict(await r.json(content_type=None))


async def _members(client: Client, auth: dict[str, str], group_id: str) -> set[str]:
    r = await client.get(f"/scim/v2/Groups/{group_id}", headers=auth)
    assert r.status == 200, await r.text()
    return {m["value"] for m in (await r.json(content_type=None)).get("members", [])}


async def test_sixteen_clients_patching_one_user_lose_nothing(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    user = await create(client, auth, user_name="shared@contoso.com")
    path = f"/scim/v2/Users/{user['id']}"

    async def one(i: int) -> tuple[int, Any, str]:
        # Each client adds an e-mail of its own and a role of its own.
        return await _patch(
            client,
            auth,
            path,
            ops(
                {"op": "add", "path": "emails", "value": [{"value": f"c{i}@x.example"}]},
                {"op": "add", "path": f'roles[type eq "t{i}"].value', "value": f"r{i}"},
            ),
        )

    results = await asyncio.gather(*(one(i) for i in range(CLIENTS)))
    assert [status for status, _, _ in results] == [200] * CLIENTS, results
    final = await get_user(client, auth, user["id"])
    emails = {e["value"] for e in final["emails"]}
    assert {f"c{i}@x.example" for i in range(CLIENTS)} <= emails
    roles = {(r["type"], r["value"]) for r in final["roles"]}
    assert roles == {(f"t{i}", f"r{i}") for i in range(CLIENTS)}
    # Every reply is a state some serial order of the writes passes through: the versions
    # are all different, and the final one is the highest.
    versions = [int(etag.removeprefix('W/"').rstrip('"')) for _, _, etag in results]
    assert len(set(versions)) == CLIENTS
    assert final["meta"]["version"] == f'W/"{max(versions)}"'
    # The view agrees with the events: as many versions as the stream has events.
    stream = await database.pool.fetchval(
        "SELECT max(originator_version) FROM stored_events WHERE originator_id = $1::uuid",
        user["id"],
    )
    assert stream == max(versions)


async def test_sixteen_clients_adding_members_to_one_group_lose_nothing(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    group = await _new_group(client, auth, "Everyone")
    users = [await create(client, auth, user_name=f"m{i}@contoso.com") for i in range(CLIENTS)]
    path = f"/scim/v2/Groups/{group['id']}"

    async def add(user_id: str) -> tuple[int, Any, str]:
        body = ops({"op": "Add", "path": "members", "value": [{"value": user_id}]})
        return await _patch(client, auth, path, body)

    results = await asyncio.gather(*(add(u["id"]) for u in users))
    assert [status for status, _, _ in results] == [204] * CLIENTS, results
    assert await _members(client, auth, group["id"]) == {u["id"] for u in users}

    # And all of them leaving at once, half of them with a rename of the group in between.
    async def leave(i: int) -> tuple[int, Any, str]:
        operations: list[dict[str, Any]] = [
            {"op": "Remove", "path": "members", "value": [{"value": users[i]["id"]}]}
        ]
        if i % 2:
            operations.append({"op": "Replace", "path": "displayName", "value": f"Everyone {i}"})
        return await _patch(client, auth, path, ops(*operations))

    results = await asyncio.gather(*(leave(i) for i in range(CLIENTS)))
    assert [status for status, _, _ in results] == [204] * CLIENTS, results
    assert await _members(client, auth, group["id"]) == set()
    rows = await database.pool.fetchval(
        "SELECT count(*) FROM scim_group_members WHERE group_id = $1::uuid", group["id"]
    )
    assert rows == 0


async def test_if_match_lets_one_stale_writer_win_and_412s_the_others(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    user = await create(client, auth, user_name="etag@contoso.com")
    group = await _new_group(client, auth, "Tagged")
    for kind, resource in (("Users", user), ("Groups", group)):
        path = f"/scim/v2/{kind}/{resource['id']}"
        stale = resource["meta"]["version"]

        async def one(i: int, path: str = path, stale: str = stale) -> tuple[int, Any, str]:
            """Status, body and the request's id (the service's, from X-Request-Id)."""
            body = ops({"op": "replace", "path": "displayName", "value": f"writer {i}"})
            r = await client.patch(path, json=body, headers={**headers(auth), "If-Match": stale})
            text = await r.text()
            parsed = (await r.json(content_type=None)) if text else None
            return r.status, parsed, r.headers["X-Request-Id"]

        results = await asyncio.gather(*(one(i) for i in range(CLIENTS)))
        won = [i for i, (status, _, _) in enumerate(results) if status < 300]
        lost = [i for i, (status, _, _) in enumerate(results) if status >= 300]
        # Everyone read the same version: exactly one write can be based on it.
        assert len(won) == 1, results
        for i in lost:
            status, body, _ = results[i]
            assert status == 412 and body["schemas"] == [ERROR] and body["status"] == "412"
        assert await _domain_events_of(database, [results[i][2] for i in lost]) == 0
        r = await client.get(path, headers=auth)
        assert (await r.json(content_type=None))["displayName"] == f"writer {won[0]}"


async def test_if_match_writers_that_reread_on_412_all_land(
    client: Client, auth: dict[str, str]
) -> None:
    """The optimistic client loop: GET, PATCH with If-Match, on 412 read again. Every 2xx is
    reflected at the end, and the 2xx versions form one serial history."""
    user = await create(client, auth, user_name="loop@contoso.com")
    group = await _new_group(client, auth, "Loop")
    members = [await create(client, auth, user_name=f"l{i}@contoso.com") for i in range(CLIENTS)]
    conflicts = 0

    async def writer(path: str, body: dict[str, Any]) -> str:
        nonlocal conflicts
        while True:
            r = await client.get(path, headers=auth, params={"attributes": "id"})
            etag = r.headers["ETag"]
            status, reply, new_etag = await _patch(client, auth, path, body, **{"If-Match": etag})
            if status == 412:
                conflicts += 1
                continue
            assert status in (200, 204), reply
            return new_etag

    user_path, group_path = f"/scim/v2/Users/{user['id']}", f"/scim/v2/Groups/{group['id']}"
    writes = [
        writer(user_path, ops({"op": "add", "path": "emails", "value": [{"value": f"o{i}@x"}]}))
        for i in range(CLIENTS)
    ] + [
        writer(group_path, ops({"op": "add", "path": "members", "value": [{"value": m["id"]}]}))
        for m in members
    ]
    etags = await asyncio.gather(*writes)
    assert len(set(etags[:CLIENTS])) == CLIENTS and len(set(etags[CLIENTS:])) == CLIENTS
    final = await get_user(client, auth, user["id"])
    assert {e["value"] for e in final["emails"]} >= {f"o{i}@x" for i in range(CLIENTS)}
    assert await _members(client, auth, group["id"]) == {m["id"] for m in members}
    assert conflicts > 0  # the writers did collide; If-Match turned each collision into a 412
