"""The provisioning log has an entry per request, also when requests share a transaction (the
group commit of POST /Users, issue 16): live, after a rebuild, and paged."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from domain.request import ProvisioningRequest
from domain.user import User
from infra.database import Database
from infra.tenants import IssuedToken
from projections import users as users_view
from projections.rebuild import Rebuilder
from projections.registry import PROJECTIONS
from tests.test_audit import audit_auth, settled
from tests.test_entra_users import entra_user
from tests.test_projections import settle, snapshot

Client = TestClient[Any, Any]


def _request(user: User) -> dict[str, Any]:
    return {
        "method": "POST",
        "path": "/scim/v2/Users",
        "status": 201,
        "initiatedBy": "test",
        "targetType": "User",
        "targetId": str(user.id),
        "durationMs": 1.0,
    }


async def _two_requests_in_one_transaction(
    database: Database, tenant: IssuedToken
) -> list[tuple[str, User]]:
    """Two POST /Users requests' events (each a user and its request's record), appended
    in ONE transaction through the event store, as the group commit appends them."""
    made: list[tuple[str, User]] = []
    async with database.pool.acquire() as conn, conn.transaction():
        for n in range(2):
            request_id = f"req-{n}-{uuid.uuid4().hex[:8]}"
            user = User.provision(uuid.uuid4(), tenant.tenant_id, entra_user(f"both{n}@x.com"))
            events = [
                *user.collect_events(),
                ProvisioningRequest.recorded(
                    uuid.uuid4(), tenant.tenant_id, "success", _request(user)
                ),
            ]
            await database.store.append(conn, tenant.tenant_id, events, request_id)
            await users_view.write(conn, [user])
            made.append((request_id, user))
        txids = await conn.fetch(
            "SELECT DISTINCT transaction_id FROM stored_events WHERE request_id = any($1)",
            [r for r, _ in made],
        )
        assert len(txids) == 1  # one transaction, two requests
    database.store.notify()
    return made


async def test_two_requests_in_one_transaction_are_two_entries(
    client: Client, database: Database, tenant: IssuedToken
) -> None:
    reader = await audit_auth(database)
    made = await _two_requests_in_one_transaction(database, tenant)
    body = await settled(client, reader)
    entries = {e["changeId"]: e for e in body["entries"]}
    assert set(entries) == {r for r, _ in made}
    for request_id, user in made:
        entry = entries[request_id]
        assert entry["provisioningAction"] == "create"
        assert entry["provisioningStatusInfo"]["status"] == "success"
        assert entry["targetIdentity"]["id"] == str(user.id)
        # Its own events, none of the other request's.
        types = sorted(e["type"] for e in entry["events"])
        assert types == ["RequestRecorded", "UserProvisioned"]
        streams = {e["stream"] for e in entry["events"]}
        assert str(user.id) in streams and len(streams) == 2
        names = {p["displayName"]: p["newValue"] for p in entry["modifiedProperties"]}
        assert names["userName"] == user.user_name

    # Pages of one walk both entries once, newest first (a stable order within a transaction).
    seen: list[str] = []
    token = None
    while True:
        query = "limit=1" + (f"&next={token}" if token else "")
        r = await client.get(f"/audit/v1/entries?{query}", headers=reader)
        assert r.status == 200, await r.text()
        page = await r.json()
        seen += [e["changeId"] for e in page["entries"]]
        token = page["next"]
        if token is None:
            break
    assert sorted(seen) == sorted(entries) and len(seen) == 2
    assert seen == [e["changeId"] for e in body["entries"]]

    # A rebuild of the log makes the same rows.
    await settle(database)
    before = (await snapshot(database))["audit_entries"]
    report = await Rebuilder(database, PROJECTIONS["audit"]).run()
    assert report.swapped and not report.drift, report.diffs
    assert (await snapshot(database))["audit_entries"] == before
    assert len(before) == 2


async def test_page_tokens_of_entries_without_an_id(
    client: Client, database: Database, tenant: IssuedToken
) -> None:
    """A token of an entry without an id names its position (made now), or, made before
    entries were per request, its transaction: both page on; a forged one is a 400."""
    reader = await audit_auth(database)
    made = await _two_requests_in_one_transaction(database, tenant)
    await settled(client, reader)
    rows = await database.pool.fetch(
        "SELECT activity_at, transaction_id, entry_position, change_id FROM audit_entries"
        " ORDER BY activity_at DESC, entry_position DESC"
    )
    assert [r["change_id"] for r in rows] == [r for r, _ in reversed(made)]
    newest = rows[0]

    def token(*held: Any) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(list(held))).decode().rstrip("=")

    at = newest["activity_at"].isoformat()
    for held in (
        (at, newest["transaction_id"], newest["entry_position"]),
        (at, newest["transaction_id"]),  # a token of the log before 0029
    ):
        r = await client.get(f"/audit/v1/entries?limit=5&next={token(*held)}", headers=reader)
        assert r.status == 200, await r.text()
        assert [e["changeId"] for e in (await r.json())["entries"]] == [rows[1]["change_id"]]
    for bad in ((at, newest["transaction_id"] + 999_999), (at, 1, 2, 3), (at, 1, "x")):
        r = await client.get(f"/audit/v1/entries?next={token(*bad)}", headers=reader)
        assert r.status == 400, bad
