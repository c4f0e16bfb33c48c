"""Failed requests' error details about a subject (issue 17): a 409 quotes the userName another
user holds. The detail is sealed under THAT user's key, in the `RequestRecorded` event and in the
provisioning log; erasing the holder makes it `[erased]`, nobody else's detail changes."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from infra.database import Database
from infra.sealing import ERASED
from infra.tenants import IssuedToken
from tests.test_audit import audit_auth, settled
from tests.test_entra_groups import create_group, patch_group
from tests.test_entra_users import create as create_user
from tests.test_entra_users import entra_user, headers, patch
from tests.test_erasure import _cli, _decoded, _everything

Client = TestClient[Any, Any]

ADA = "Ada.Quoted@contoso.com"
BOB = "Bob.Quoted@contoso.com"


async def _request_errors(database: Database) -> list[dict[str, Any]]:
    rows = await database.pool.fetch(
        "SELECT state FROM stored_events WHERE topic LIKE 'domain.request:%'"
        " ORDER BY transaction_id, notification_id"  # as written (a heap's order may differ)
    )
    errors = [orjson.loads(r[0]).get("error") for r in rows]
    return [e for e in errors if e]


async def _reasons(client: Client, reader: dict[str, str]) -> list[str]:
    body = await settled(client, reader)
    return [str(e) for e in body["entries"] if e.get("provisioningStatusInfo")]


async def test_a_409_is_sealed_under_the_holders_key_and_erased_with_it(
    client: Client,
    auth: dict[str, str],
    database: Database,
    tenant: IssuedToken,
    fresh_dsn: str,
) -> None:
    reader = await audit_auth(database)
    ada = await create_user(client, auth, user_name=ADA)
    bob = await create_user(client, auth, user_name=BOB)
    # A POST of Ada's userName, a PUT and a PATCH of Bob to it: 409s quoting Ada's userName.
    r = await client.post("/scim/v2/Users", json=entra_user(ADA), headers=headers(auth))
    assert r.status == 409 and ADA in (await r.json())["detail"]
    r = await client.put(f"/scim/v2/Users/{bob['id']}", json=entra_user(ADA), headers=headers(auth))
    assert r.status == 409, await r.text()
    await patch(client, auth, bob["id"], {"op": "Replace", "path": "userName", "value": ADA},
                status=409)  # fmt: skip
    # A failed PATCH of Ada herself: sealed under her own key.
    await patch(client, auth, ada["id"], {"op": "Replace", "path": "title", "value": [ADA]},
                status=400)  # fmt: skip

    errors = await _request_errors(database)
    assert len(errors) == 4, errors
    assert all(e["sealedFor"] == ada["id"] and e["detail"] == "[encrypted]" for e in errors)
    raw = b"".join(r[0] for r in await database.pool.fetch("SELECT state FROM stored_events"))
    assert ADA.encode() not in raw and ADA.lower().encode() not in raw
    # The provisioning log reads them (the holder's key is there), and stores them sealed.
    text = "\n".join(await _reasons(client, reader))
    assert text.count(ADA) >= 3, text
    stored = await database.pool.fetch("SELECT error_reason::text FROM audit_entries")
    assert not any(ADA in str(r[0]) for r in stored)

    r = await client.delete(f"/scim/v2/Users/{ada['id']}", headers=auth)
    assert r.status == 204
    await settled(client, reader)
    r = await client.post("/audit/v1/erasures", json={"userId": ada["id"]}, headers=reader)
    assert r.status == 201, await r.text()
    text = "\n".join(await _reasons(client, reader))
    assert ADA not in text and ERASED in text, text

    everything = await _everything(database)
    decoded = await _decoded(fresh_dsn, database)
    exports = b""
    for fmt in ("csv", "jsonl"):
        r = await client.get(f"/audit/v1/export?format={fmt}", headers=reader)
        exports += await r.read()
    for clear in (ADA, ADA.lower()):
        assert clear.encode() not in everything, clear
        assert clear not in decoded, clear
        assert clear.encode() not in exports, clear
    assert BOB in decoded and BOB.encode() in exports  # Bob is intact
    # A rebuild after the erasure makes the very rows the live projection holds.
    code, out, err = await _cli(fresh_dsn, "projections", "verify", "--all", "--quiet")
    assert code == 0, out + err


async def test_a_group_named_in_a_users_entry_by_its_id_and_read_by_its_name(
    client: Client,
    auth: dict[str, str],
    database: Database,
    tenant: IssuedToken,
    fresh_dsn: str,
) -> None:
    reader = await audit_auth(database)
    secret = "Friends of Ada Lovelace"
    group = await create_group(client, auth, secret)
    ada = await create_user(client, auth, user_name=ADA)
    add = {"op": "Add", "path": "members", "value": [{"value": ada["id"]}]}
    await patch_group(client, auth, group["id"], add)
    r = await client.delete(f"/scim/v2/Users/{ada['id']}", headers=auth)  # leaves the group
    assert r.status == 204
    body = await settled(client, reader)
    # Stored by the group's id; read by its current name.
    labels = await database.pool.fetch("SELECT modified_properties::text FROM audit_entries")
    text = "\n".join(r[0] for r in labels)
    assert f"group {group['id']}: members removed" in text and secret not in text
    deletion = next(e for e in body["entries"] if e["provisioningAction"] == "delete")
    assert f"group {secret}: members removed" in str(deletion), deletion

    # The group goes and is erased: its name is nowhere, the user's entry names it by id.
    r = await client.delete(f"/scim/v2/Groups/{group['id']}", headers=auth)
    assert r.status == 204
    await settled(client, reader)
    r = await client.post("/audit/v1/erasures", json={"groupId": group["id"]}, headers=reader)
    assert r.status == 201, await r.text()
    body = await settled(client, reader)
    deletion = next(e for e in body["entries"] if e["provisioningAction"] == "delete"
                    and e.get("targetIdentity", {}).get("id") == ada["id"])  # fmt: skip
    assert f"group {group['id']}: members removed" in str(deletion), deletion
    everything = await _everything(database)
    exports = b""
    for fmt in ("csv", "jsonl"):
        r = await client.get(f"/audit/v1/export?format={fmt}", headers=reader)
        exports += await r.read()
    assert secret.encode() not in everything and secret.encode() not in exports
    assert group["id"].encode() in exports
    code, out, err = await _cli(fresh_dsn, "projections", "verify", "--all", "--quiet")
    assert code == 0, out + err
