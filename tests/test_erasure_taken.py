"""A 409 on a declared `uniqueness: server` extension attribute quotes the value another subject
holds (issue 17): its record is sealed under the HOLDER's key, like a taken userName's
(service/taken.py finds the holder by the attribute's unique index), and reads `[erased]` once the
holder is erased."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from infra.database import Database
from infra.schemas import declare, parse_declaration
from infra.sealing import ERASED
from tests.test_audit import audit_auth
from tests.test_entra_groups import GROUP
from tests.test_entra_users import entra_user, headers, patch
from tests.test_erasure import _cli, _everything
from tests.test_erasure_details import _reasons, _request_errors

Client = TestClient[Any, Any]

BADGE = "urn:example:params:scim:schemas:extension:Badge:2.0:User"
TEAM = "urn:example:params:scim:schemas:extension:Team:2.0:Group"
NUMBER = "Badge-Ada-4711"  # Ada's badge number: personal
CODE = "Team-Ada-Lovelace"  # the group's code names a person too


async def _created(client: Client, auth: dict[str, str], path: str, body: Any) -> Any:
    r = await client.post(path, json=body, headers=headers(auth))
    assert r.status == 201, await r.text()
    return await r.json(content_type=None)


async def _taken(client: Client, auth: dict[str, str], path: str, body: Any, value: str) -> None:
    r = await client.post(path, json=body, headers=headers(auth))
    reply = await r.json(content_type=None)
    assert r.status == 409 and reply["scimType"] == "uniqueness", reply
    assert value in reply["detail"]  # the client is told which value, as before


async def test_a_409_on_a_declared_unique_attribute_is_sealed_under_the_holders_key(
    client: Client, auth: dict[str, str], database: Database, fresh_dsn: str
) -> None:
    badge = {"id": BADGE, "attributes": [{"name": "number", "uniqueness": "server"}]}
    team = {"id": TEAM, "attributes": [{"name": "code", "uniqueness": "server"}]}
    async with database.pool.acquire() as conn:
        await declare(conn, database.store, "acme", parse_declaration(badge), "User", "t")
        await declare(conn, database.store, "acme", parse_declaration(team), "Group", "t")
    reader = await audit_auth(database)

    def user(name: str, number: str) -> dict[str, Any]:
        return {**entra_user(name), BADGE: {"number": number}}

    def group(name: str, code: str) -> dict[str, Any]:
        return {"schemas": [GROUP], "displayName": name, TEAM: {"code": code}}

    ada = await _created(client, auth, "/scim/v2/Users", user("ada@contoso.com", NUMBER))
    bob = await _created(client, auth, "/scim/v2/Users", user("bob@contoso.com", "B-2"))
    adas = await _created(client, auth, "/scim/v2/Groups", group("Ada's", CODE))
    # A POST with Ada's number (other case: the index is case-insensitive), a PATCH of Bob to
    # it, a POST of a group with the code of Ada's group: 409s quoting values they hold.
    await _taken(client, auth, "/scim/v2/Users", user("eve@contoso.com", NUMBER.upper()),
                 NUMBER.upper())  # fmt: skip
    await patch(client, auth, bob["id"], {"op": "Replace", "path": f"{BADGE}:number",
                                          "value": NUMBER}, status=409)  # fmt: skip
    await _taken(client, auth, "/scim/v2/Groups", group("Other", CODE), CODE)

    errors = await _request_errors(database)
    assert [e["sealedFor"] for e in errors] == [ada["id"], ada["id"], adas["id"]], errors
    assert all(e["detail"] == "[encrypted]" for e in errors)
    # Neither the events nor the provisioning log's rows hold them in clear (the views hold
    # the holders' current values until they go); the log reads them with the holders' keys.
    text = "\n".join(await _reasons(client, reader))
    assert NUMBER.upper() in text and NUMBER in text and CODE in text, text
    stored = b"".join(r[0] for r in await database.pool.fetch("SELECT state FROM stored_events"))
    entries = await database.pool.fetch("SELECT error_reason::text FROM audit_entries")
    for clear in (NUMBER, NUMBER.upper(), CODE):
        assert clear.encode() not in stored, clear
        assert not any(clear in str(r[0]) for r in entries), clear

    for path in (f"/scim/v2/Users/{ada['id']}", f"/scim/v2/Groups/{adas['id']}"):
        r = await client.delete(path, headers=auth)
        assert r.status == 204
    for erasure in ({"userId": ada["id"]}, {"groupId": adas["id"]}):
        r = await client.post("/audit/v1/erasures", json=erasure, headers=reader)
        assert r.status == 201, await r.text()
    text = "\n".join(await _reasons(client, reader))
    assert NUMBER.upper() not in text and NUMBER not in text and CODE not in text, text
    assert text.count(ERASED) >= 3, text
    everything = await _everything(database)
    for clear in (NUMBER, NUMBER.upper(), CODE):
        assert clear.encode() not in everything, clear
    code, out, err = await _cli(fresh_dsn, "projections", "verify", "--all", "--quiet")
    assert code == 0, out + err
