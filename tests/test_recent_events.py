"""The audit runner's fast path (infra.eventstore.RecentEvents): the events this process just
committed are applied as written, not decoded again, and the result is the one decoding gives."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from domain.user import User
from infra.database import Database
from infra.eventstore import EventStore, RecentEvents
from infra.tenants import IssuedToken
from projections.registry import PROJECTIONS
from projections.runner import Runner
from projections.state import register
from tests.test_entra_groups import create_group
from tests.test_entra_users import PATCH_OP, headers
from tests.test_entra_users import create as create_user
from tests.test_projections import rebuild_all
from tests.test_runner import eventually

AUDIT = PROJECTIONS["audit"]


async def audit_entries(database: Database, tenant_id: uuid.UUID) -> int:
    sql = "SELECT count(*) FROM audit_entries WHERE tenant_id = $1"
    return int(await database.pool.fetchval(sql, tenant_id))


async def test_the_app_applies_its_own_events_as_written_and_a_rebuild_agrees(
    client: TestClient[Any, Any],
    auth: dict[str, str],
    database: Database,
    tenant: IssuedToken,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded: list[Any] = []
    original = EventStore.to_domain

    def counting(self: EventStore, recorded: Any) -> Any:
        decoded.append(recorded)
        return original(self, recorded)

    monkeypatch.setattr(EventStore, "to_domain", counting)
    ids = [
        (await create_user(client, auth, user_name=f"fast{i}@contoso.com"))["id"]
        for i in range(4)
    ]
    r = await client.patch(
        f"/scim/v2/Users/{ids[0]}",
        json={
            "schemas": [PATCH_OP],
            "Operations": [{"op": "replace", "path": "displayName", "value": "Fast Zero"}],
        },
        headers=headers(auth),
    )
    assert r.status == 200, await r.text()
    await create_group(client, auth)
    writes = 6  # four POSTs, a PATCH, a group: one entry each

    async def caught_up() -> bool:
        return await audit_entries(database, tenant.tenant_id) == writes

    await eventually(caught_up)
    # Every event the runner applied was this process's own: none was decoded again. (The one
    # decoded is the PATCH's: its handler replays the user's stream.)
    assert [(r.originator_id, r.originator_version) for r in decoded] == [(uuid.UUID(ids[0]), 1)]
    assert len(database.store.recent) >= 2 * writes
    monkeypatch.undo()
    # Replayed from the store (decoded), the provisioning log is the same, row for row.
    for report in await rebuild_all(database, dry_run=True):
        assert not report.drift, (report.name, report.diffs)


async def test_events_it_does_not_hold_are_read_from_the_store_and_decoded(
    database: Database,
) -> None:
    tenant_id = uuid.uuid4()
    async with database.pool.acquire() as conn:
        await register(conn, [AUDIT])
    users = [User.provision(uuid.uuid4(), tenant_id, {"userName": f"s{i}@x"}) for i in range(3)]
    written = [e for u in users for e in u.collect_events()]
    recorded = await database.store.append_now(tenant_id, written)
    # As another instance (or this one after a restart) would find them: not in memory.
    database.store.recent.clear()
    conn = await database.connect()
    try:
        batch = await database.store.read_all(limit=100, conn=conn, heads=True)
        assert [r.notification_id for r in batch] == [r.notification_id for r in recorded]
        assert all(r.state == b"" for r in batch)  # heads only: no state read
        events = await database.store.decode(conn, batch)
        assert [type(e) for e in events] == [type(e) for e in written]
        assert all(e is not w for e, w in zip(events, written, strict=True))  # decoded anew
        assert [vars(e) for e in events] == [vars(w) for w in written]
        assert await Runner(database, AUDIT).step(conn) == len(written)
    finally:
        await conn.close()
    assert await audit_entries(database, tenant_id) == 1  # one transaction, one entry


def test_recent_events_are_bounded_and_matched_by_stream_and_version() -> None:
    tenant_id = uuid.uuid4()
    recent = RecentEvents(cap=3)
    users = [User.provision(uuid.uuid4(), tenant_id, {"userName": f"b{i}@x"}) for i in range(5)]
    events = [e for u in users for e in u.collect_events()]

    def recorded(i: int, version: int = 1) -> Any:
        e = events[i]
        return type("R", (), {"notification_id": 100 + i, "originator_id": e.originator_id,
                              "originator_version": version})()  # fmt: skip

    recent.remember([recorded(i) for i in range(5)], events)
    assert len(recent) == 3  # the oldest went first
    assert recent.get(recorded(0)) is None
    assert recent.get(recorded(4)) is events[4]
    assert recent.get(recorded(4, version=2)) is None  # another version: not this event
