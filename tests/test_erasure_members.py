"""A group's members' displays are the members' names: erasing a member makes its display
unreadable in the group's events too (issue 17), everyone else's stays."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from aiohttp.test_utils import TestClient

from infra.database import Database
from infra.tenants import IssuedToken
from tests.test_audit import audit_auth, settled
from tests.test_entra_groups import create_group, patch_group
from tests.test_entra_users import create as create_user
from tests.test_erasure import _cli, _decoded, _everything

Client = TestClient[Any, Any]

ADA_DISPLAY = "Countess Ada of the Engine"
BOB_DISPLAY = "Bob of the Difference"


def _displays(group: dict[str, Any]) -> dict[str, str | None]:
    return {m["value"]: m.get("display") for m in group.get("members", [])}


async def test_an_erased_members_display_is_erased_in_the_groups_events(
    client: Client,
    auth: dict[str, str],
    database: Database,
    tenant: IssuedToken,
    fresh_dsn: str,
) -> None:
    reader = await audit_auth(database)
    ada = await create_user(client, auth, user_name="ada.m@contoso.com")
    bob = await create_user(client, auth, user_name="bob.m@contoso.com")
    group = await create_group(client, auth, "Engine Room")
    members = [
        {"value": ada["id"], "display": ADA_DISPLAY},
        {"value": bob["id"], "display": BOB_DISPLAY},
    ]
    await patch_group(client, auth, group["id"], {"op": "Add", "path": "members", "value": members})
    r = await client.get(f"/scim/v2/Groups/{group['id']}", headers=auth)
    assert _displays(await r.json(content_type=None)) == {
        ada["id"]: ADA_DISPLAY,
        bob["id"]: BOB_DISPLAY,
    }
    # Sealed in the group's event, as before; now under each member's own key.
    raw = b"".join(r[0] for r in await database.pool.fetch("SELECT state FROM stored_events"))
    assert ADA_DISPLAY.encode() not in raw and BOB_DISPLAY.encode() not in raw
    assert ADA_DISPLAY in await _decoded(fresh_dsn, database)  # readable while Ada is known

    await asyncio.sleep(0.01)
    at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    r = await client.get(f"/audit/v1/resources/{group['id']}?at={at}", headers=reader)
    assert r.status == 200, await r.text()
    assert _displays(await r.json())[ada["id"]] == ADA_DISPLAY

    r = await client.delete(f"/scim/v2/Users/{ada['id']}", headers=auth)
    assert r.status == 204
    await settled(client, reader)
    r = await client.post("/audit/v1/erasures", json={"userId": ada["id"]}, headers=reader)
    assert r.status == 201, await r.text()
    receipt = await r.json()
    await settled(client, reader)

    # Nowhere readable: not in any table, not in any event a fresh process decodes (the group's
    # key, which stays, does not open it), not in time travel to before the erasure.
    decoded = await _decoded(fresh_dsn, database)
    assert ADA_DISPLAY not in decoded
    assert ADA_DISPLAY.encode() not in await _everything(database)
    assert BOB_DISPLAY in decoded  # Bob's is intact
    r = await client.get(f"/audit/v1/resources/{group['id']}?at={at}", headers=reader)
    assert r.status == 200, await r.text()
    body = await r.read()
    assert ADA_DISPLAY.encode() not in body
    assert _displays(await r.json()) == {ada["id"]: "[erased]", bob["id"]: BOB_DISPLAY}
    r = await client.get(f"/audit/v1/resources/{group['id']}/history", headers=reader)
    assert r.status == 200 and ADA_DISPLAY.encode() not in await r.read()
    r = await client.get(f"/scim/v2/Groups/{group['id']}", headers=auth)
    assert _displays(await r.json(content_type=None)) == {bob["id"]: BOB_DISPLAY}

    # The group still changes (its events are sealed as before) and everything rebuilds clean.
    await patch_group(
        client, auth, group["id"], {"op": "Replace", "path": "displayName", "value": "Engine Hall"}
    )
    code, out, err = await _cli(fresh_dsn, "projections", "verify", "--all", "--quiet")
    assert code == 0, out + err
    code, out, err = await _cli(fresh_dsn, "erase", "verify", receipt["id"])
    assert code == 0, out + err


async def test_migrate_seals_an_old_groups_member_displays_under_the_members_keys(
    database: Database, tenant: IssuedToken, fresh_dsn: str
) -> None:
    from domain.group import Group
    from domain.user import User
    from infra.transcoder import make_mapper
    from service import erasure

    # A store from before encryption: a user and a group with a display of it, in clear.
    plain = make_mapper()
    person = User.provision(uuid4(), tenant.tenant_id, {"userName": "old.m@contoso.com"})
    team = Group.create(uuid4(), tenant.tenant_id, "Old Team", None)
    team.change_membership([str(person.id)], [], {str(person.id): ADA_DISPLAY})
    async with database.pool.acquire() as conn:
        for aggregate in (person, team):
            stored = [plain.to_stored_event(e) for e in aggregate.collect_events()]
            await database.store.append_stored(conn, tenant.tenant_id, stored)
    raw = b"".join(r[0] for r in await database.pool.fetch("SELECT state FROM stored_events"))
    assert ADA_DISPLAY.encode() in raw

    # The group is migrated first (the person's stream gets its key then): display kept.
    async with database.pool.acquire() as conn, conn.transaction():
        assert await erasure.seal_stream(database, conn, tenant.tenant_id, team.id) == 2
    code, out, err = await _cli(fresh_dsn, "erase", "migrate", "--quiet")
    assert code == 0 and "1 event(s) encrypted" in out, out + err
    raw = b"".join(r[0] for r in await database.pool.fetch("SELECT state FROM stored_events"))
    assert ADA_DISPLAY.encode() not in raw
    assert ADA_DISPLAY in await _decoded(fresh_dsn, database)

    await erasure.erase(database, tenant.tenant_id, person.id, "User", "dpo", "request 2")
    decoded = await _decoded(fresh_dsn, database)
    assert ADA_DISPLAY not in decoded and "Old Team" in decoded
