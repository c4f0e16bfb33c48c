"""Replay: rebuild, verify and swap projections while the service keeps serving."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from eventsourcing.persistence import StoredEvent

from domain.group import Group
from domain.user import User
from infra.database import Database
from infra.eventstore import RecordedEvent
from infra.tenants import IssuedToken
from infra.transcoder import OrjsonTranscoder
from projections import rebuild, shadow, state, users
from projections.rebuild import Rebuilder, RebuildReport
from projections.registry import PROJECTIONS
from service.unit_of_work import UnitOfWork
from tests.test_cli import run
from tests.test_entra_groups import GROUP
from tests.test_entra_users import ENTERPRISE, PATCH_OP, entra_user, headers

Client = TestClient[Any, Any]
Snapshot = dict[str, list[tuple[Any, ...]]]
TABLES = [t for p in PROJECTIONS.values() for t in p.tables]


async def snapshot(db: Database) -> Snapshot:
    """Every live projection table, ordered by primary key, as Python values, in one snapshot."""
    out: Snapshot = {}
    async with db.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        for table in TABLES:
            _, keys = await shadow.primary_key(conn, table)
            rows = await conn.fetch(f"SELECT * FROM {table} ORDER BY {', '.join(keys)}")
            out[table] = [tuple(r.values()) for r in rows]
    return out


async def settle(db: Database, within: float = 30.0) -> None:
    """Wait until the app's runners have brought every asynchronous projection to the end of
    the log (inline ones always are there); fail if they never do."""
    deadline = time.monotonic() + within
    while any(r["events_behind"] for r in await state.status(db, list(PROJECTIONS.values()))):
        assert time.monotonic() < deadline, "the asynchronous projections never caught up"
        await asyncio.sleep(0.05)


async def table_oids(db: Database) -> dict[str, int]:
    """Which physical table answers to each live name (a swap changes it)."""
    return {t: await db.pool.fetchval("SELECT $1::text::regclass::oid", t) for t in TABLES}


async def leftover_shadows(db: Database) -> list[str]:
    rows = await db.pool.fetch(
        "SELECT tablename FROM pg_tables WHERE tablename LIKE $1", f"%{shadow.SUFFIX}"
    )
    return [r["tablename"] for r in rows]


async def rebuild_all(db: Database, *, dry_run: bool = False, **kw: Any) -> list[RebuildReport]:
    return [await Rebuilder(db, p, **kw).run(dry_run=dry_run) for p in PROJECTIONS.values()]


def ops(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": list(operations)}


def group_body(name: str) -> dict[str, Any]:
    return {"schemas": [GROUP], "externalId": str(uuid.uuid4()), "displayName": name}


def set_(path: str | None, value: Any, op: str = "replace") -> dict[str, Any]:
    return ops({"op": op, "value": value, **({"path": path} if path else {})})


def add_member(member: str) -> dict[str, Any]:
    return set_("members", [{"value": member}], "add")


@dataclass
class Scim:
    client: Client
    auth: dict[str, str]

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        r = await self.client.request(
            method, f"/scim/v2/{path}", json=body, headers=headers(self.auth)
        )
        text = await r.text()
        return r.status, json.loads(text) if text else None

    async def ok(self, expected: int, method: str, path: str, body: Any = None) -> Any:
        status, reply = await self.call(method, path, body)
        assert status == expected, (method, path, body, status, reply)
        return reply


@pytest.fixture
def api(client: Client, auth: dict[str, str]) -> Scim:
    return Scim(client, auth)


async def workload(api: Scim, rng: random.Random, n: int = 24) -> None:
    """Users, patches, groups, memberships, nesting, renames, deletes, and refused requests."""
    ok = api.ok
    ids: list[str] = []
    names: dict[str, str] = {}
    for i in range(n):
        body = entra_user(f"user{i}@contoso.com")
        if rng.random() < 0.5:
            body[ENTERPRISE] = {"department": rng.choice(("Sales", "Finance", "Legal"))}
        if ids and rng.random() < 0.3:
            body.setdefault(ENTERPRISE, {})["manager"] = {"value": rng.choice(ids)}
        ids.append((await ok(201, "POST", "Users", body))["id"])
        names[ids[-1]] = body["userName"]
    await ok(409, "POST", "Users", entra_user(names[ids[0]].upper()))

    async def patch_users(count: int) -> None:
        for _ in range(count):
            uid, kind, k = rng.choice(ids), rng.randrange(6), rng.randrange(10**9)
            if kind == 0:
                names[uid] = f"renamed{k}@contoso.com"
            email = [{"type": "work", "value": f"e{k}@x.org", "primary": True}]
            body = (
                set_("userName", names[uid]),
                set_("emails", email),
                set_("active", k % 2 == 0),
                ops({"op": "remove", "path": "active"}),
                set_(f"{ENTERPRISE}:department", f"D{k % 7}", "add"),
                set_("displayName", f"Person {k}"),
            )[kind]
            await ok(200, "PATCH", f"Users/{uid}", body)

    await patch_users(3 * n)
    a, b = rng.sample(ids, 2)
    await ok(409, "PATCH", f"Users/{a}", set_("userName", names[b]))
    await ok(404, "PATCH", f"Users/{uuid.uuid4()}", ops({"op": "remove", "path": "active"}))

    groups = [(await ok(201, "POST", "Groups", group_body(f"Group {g}")))["id"] for g in range(5)]
    await ok(409, "POST", "Groups", group_body("GROUP 0"))
    for _ in range(20):
        gid, batch = rng.choice(groups), rng.sample(ids, rng.randint(1, 6))
        shown = {u for u in batch if rng.random() < 0.5}
        value = [{"value": u, **({"display": names[u]} if u in shown else {})} for u in batch]
        op = "add" if rng.random() < 0.7 else "remove"
        await ok(204, "PATCH", f"Groups/{gid}", set_("members", value, op))

    await ok(204, "PATCH", f"Groups/{groups[0]}", add_member(groups[1]))  # nested, deleted below
    await ok(204, "PATCH", f"Groups/{groups[2]}", add_member(groups[4]))  # nested, kept
    await ok(400, "PATCH", f"Groups/{groups[1]}", add_member(groups[0]))  # a cycle
    await ok(400, "PATCH", f"Groups/{groups[2]}", add_member(str(uuid.uuid4())))  # no such member
    await ok(404, "PATCH", f"Groups/{uuid.uuid4()}", add_member(groups[1]))
    for g in rng.sample(groups, 3):
        await ok(204, "PATCH", f"Groups/{g}", set_("displayName", f"Renamed {g}"))
    taken = (await ok(200, "GET", f"Groups/{groups[3]}"))["displayName"].upper()
    await ok(409, "PATCH", f"Groups/{groups[4]}", set_("displayName", taken))

    for uid in rng.sample(ids, 3):
        await ok(204, "DELETE", f"Users/{uid}")
        await ok(404, "DELETE", f"Users/{uid}")
        ids.remove(uid)
    for gid in (groups[1], groups[3]):
        await ok(204, "DELETE", f"Groups/{gid}")
        await ok(404, "GET", f"Groups/{gid}")
    await patch_users(n)


async def test_rebuild_reproduces_every_live_view(api: Scim, database: Database) -> None:
    await workload(api, random.Random(20240501))
    await settle(database)
    before = await snapshot(database)
    # The workload reached the interesting shapes, so an equal rebuild means something.
    members, people = before["scim_group_members"], before["scim_users"]
    assert {m[3] for m in members} == {"User", "Group"} and any(m[4] for m in members)
    assert {u[4] for u in people} == {True, False, None} and any(u[6] for u in people)
    assert any("department" in u[7].get("enterprise", {}) for u in people)
    total = await database.pool.fetchval("SELECT count(*) FROM stored_events")

    for _ in range(2):  # a second rebuild of a rebuilt view changes nothing either
        oids = await table_oids(database)
        reports = await rebuild_all(database)
        assert [r.name for r in reports] == list(PROJECTIONS)
        for report in reports:
            assert report.swapped and report.events == total
            assert not report.drift, report.diffs
        assert await snapshot(database) == before
        assert set((await table_oids(database)).values()).isdisjoint(oids.values())
    assert await leftover_shadows(database) == []


async def seed(database: Database, tenant_id: uuid.UUID) -> list[str]:
    """~2000 events through the write path's own unit of work, so a rebuild takes a while."""
    async with UnitOfWork(database, tenant_id, "seed") as uow:
        people = [
            User.provision(uuid.uuid4(), tenant_id, {"userName": f"{i}@x"}) for i in range(1500)
        ]
        for i, user in enumerate(people):
            if i % 3 == 0:
                user.update({**user.state, "displayName": f"Seed {i}"})
            uow.add_user(user)
        teams = [Group.create(uuid.uuid4(), tenant_id, f"Team {t}") for t in range(8)]
        for t, team in enumerate(teams):
            team.change_membership([str(u.id) for u in people[t * 60 : t * 60 + 60]], [])
            uow.add_group(team)
        await uow.flush()
    return [str(t.id) for t in teams]


async def test_rebuild_while_writes_continue(
    api: Scim, database: Database, tenant: IssuedToken
) -> None:
    teams = await seed(database, tenant.tenant_id)
    assert await database.pool.fetchval("SELECT count(*) FROM stored_events") >= 2000
    stop, warm = asyncio.Event(), asyncio.Event()
    acked: dict[str, dict[str, Any]] = {}  # user id: the last reply it got
    joined: set[tuple[str, str]] = set()  # (group, member) adds acknowledged
    spans: list[tuple[float, float]] = []  # when each acknowledged request ran
    failures: list[Any] = []

    async def timed(method: str, path: str, body: Any, expected: int) -> Any:
        started = time.monotonic()
        status, reply = await api.call(method, path, body)
        if status != expected:
            failures.append((method, path, status, reply))
            return None
        spans.append((started, time.monotonic()))
        if len(spans) >= 40:
            warm.set()
        return reply if reply is not None else {}

    async def writer(w: int) -> None:
        rng, i = random.Random(w), 0
        while not stop.is_set():
            i += 1
            user = await timed("POST", "Users", entra_user(f"w{w}-{i}@contoso.com"), 201)
            if user is None:
                continue
            uid, team = user["id"], rng.choice(teams)
            acked[uid] = user
            if await timed("PATCH", f"Groups/{team}", add_member(uid), 204) is not None:
                joined.add((team, uid))
            change: dict[str, Any] = {"displayName": f"Writer {w} #{i}", "active": i % 3 > 0}
            if i % 4 == 0:
                change["userName"] = f"r{w}-{i}@x.org"
            acked[uid] = await timed("PATCH", f"Users/{uid}", set_(None, change), 200) or user
            got = await timed("GET", f"Users/{uid}", None, 200)
            if got is not None and got["meta"]["version"] != acked[uid]["meta"]["version"]:
                failures.append(("stale read", uid, got, acked[uid]))

    writers = [asyncio.create_task(writer(w)) for w in range(4)]
    try:
        await asyncio.wait_for(warm.wait(), 60)
        windows = []
        for projection in PROJECTIONS.values():
            for dry_run in (False, True):  # swap, then verify, both under load
                started = time.monotonic()
                report = await Rebuilder(database, projection, batch_size=100).run(dry_run=dry_run)
                windows.append((f"{projection.name} {dry_run=}", started, time.monotonic()))
                assert report.swapped != dry_run and not (dry_run and report.drift), f"{report}"
    finally:
        stop.set()
        await asyncio.gather(*writers)

    assert failures == []
    for name, start, end in windows:
        during = [s for s in spans if start <= s[0] and s[1] <= end]
        assert len(during) >= 3, f"only {len(during)} writes overlapped the {name} rebuild"
    sql = "SELECT id::text, user_name, display_name, active, version FROM scim_users"
    live = {r["id"]: (*r.values(),)[1:] for r in await database.pool.fetch(sql)}
    for uid, u in acked.items():
        version = int(u["meta"]["version"][3:-1])  # W/"n"
        assert live.get(uid) == (u["userName"], u.get("displayName"), u["active"], version)
    sql = "SELECT group_id::text, member_id::text FROM scim_group_members"
    assert joined <= {(*r.values(),) for r in await database.pool.fetch(sql)}
    await settle(database)
    for report in await rebuild_all(database, dry_run=True):
        assert not report.swapped and not report.drift, report.diffs


async def test_a_write_committing_while_the_swap_waits_is_in_the_new_view(
    database: Database, tenant: IssuedToken
) -> None:
    """A writer with the lower transaction id is still in progress when the rebuild compares
    (in a snapshot where a later writer is already committed), and commits while the swap waits
    for its lock: its change must be in the swapped-in view. (Comparing once moved the position
    past it, and the swap then never applied it: a lost write.)"""
    tid = tenant.tenant_id
    people = [User.provision(uuid.uuid4(), tid, {"userName": f"p{i}@x"}) for i in range(3)]
    async with UnitOfWork(database, tid, "seed") as uow:
        for person in people:
            uow.add_user(person)
        await uow.flush()
    first, second = people[0].id, people[1].id

    async def rename(uow: UnitOfWork, user_id: uuid.UUID, name: str) -> None:
        user = await uow.user_for_update(user_id)
        assert user is not None
        user.update({**user.state, "displayName": name})
        await uow.flush()

    async with UnitOfWork(database, tid, "early") as early:
        await (await early.begin()).fetchval("SELECT pg_current_xact_id()")  # the lower id
        async with UnitOfWork(database, tid, "later") as later:
            await rename(later, second, "Later")
        await rename(early, first, "Early")  # written to the live view, not yet committed
        rebuilding = asyncio.create_task(Rebuilder(database, PROJECTIONS["users"]).run())
        # Until the swap waits for this transaction's lock on the live view.
        for _ in range(400):
            waiting = await database.pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE 'LOCK TABLE scim_users%'"
            )
            if waiting or rebuilding.done():
                break
            await asyncio.sleep(0.02)
        assert waiting and not rebuilding.done()
    report = await rebuilding
    assert report.swapped
    sql = "SELECT id, display_name FROM scim_users WHERE tenant_id = $1"
    names = {r["id"]: r["display_name"] for r in await database.pool.fetch(sql, tid)}
    assert (names[first], names[second]) == ("Early", "Later")
    (check,) = [r for r in await rebuild_all(database, dry_run=True) if r.name == "users"]
    assert not check.drift, check.diffs


async def test_dry_run_names_what_a_fixed_handler_would_change(
    api: Scim, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = users.row_of

    def broken(user: User) -> tuple[Any, ...]:
        row = original(user)  # its resource is a copy of the state
        row[7].get("enterprise", {}).pop("department", None)
        return row

    monkeypatch.setattr(users, "row_of", broken)
    ids = {}
    for i in range(5):
        body = entra_user(f"dept{i}@contoso.com")
        if i < 3:
            body[ENTERPRISE] = {"department": "Sales", "costCenter": "C1"}
        ids[body["userName"]] = (await api.ok(201, "POST", "Users", body))["id"]
    affected = {"dept0@contoso.com", "dept1@contoso.com", "dept2@contoso.com"}
    monkeypatch.undo()  # the fixed code

    async def department(name: str) -> Any:
        user = await api.ok(200, "GET", f"Users/{ids[name]}")
        return user.get(ENTERPRISE, {}).get("department")

    assert [await department(n) for n in sorted(affected)] == [None] * 3
    await settle(database)
    before, oids = await snapshot(database), await table_oids(database)
    report = await Rebuilder(database, PROJECTIONS["users"]).run(dry_run=True)
    assert not report.swapped and [d.table for d in report.diffs] == ["scim_users"]
    (found,) = report.diffs
    assert (found.added, found.removed, found.changed) == (0, 0, len(affected))
    assert set(found.samples) == {"changed"}
    named = {n for n in ids for s in found.samples["changed"] if f"user {n!r}" in s}
    assert named == affected and len(found.samples["changed"]) == len(affected)
    assert all("resource: enterprise" in s for s in found.samples["changed"])
    # A dry run swaps nothing: the live view is still the broken one.
    assert await snapshot(database) == before and await table_oids(database) == oids
    assert await leftover_shadows(database) == []

    report = await Rebuilder(database, PROJECTIONS["users"]).run()
    assert report.swapped and report.diffs[0].changed == len(affected)
    assert [await department(n) for n in sorted(affected)] == ["Sales"] * 3
    assert await department("dept3@contoso.com") is None
    assert not (await Rebuilder(database, PROJECTIONS["users"]).run(dry_run=True)).drift


async def test_version_1_events_are_upcast_on_replay(
    api: Scim, database: Database, tenant: IssuedToken
) -> None:
    user_id, group_id, tenant_id = uuid.uuid4(), uuid.uuid4(), tenant.tenant_id
    at = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

    def v1(stream: uuid.UUID, version: int, topic: str, **state: Any) -> StoredEvent:
        state = {"timestamp": at + timedelta(minutes=version), **state}
        return StoredEvent(stream, version, topic, OrjsonTranscoder().encode(state))

    stored = [
        v1(user_id, 1, "domain.user:User.UserProvisioned", originator_topic="domain.user:User",
           tenant_id=tenant_id, user_name="legacy@contoso.com", attributes={"active": True}),
        v1(user_id, 2, "domain.user:User.EmailChanged", email="kim@contoso.com"),
        v1(group_id, 1, "domain.group:Group.GroupCreated", originator_topic="domain.group:Group",
           tenant_id=tenant_id, display_name="Legacy", external_id=None),
        v1(group_id, 2, "domain.group:Group.GroupMembershipChanged", added=[str(user_id)],
           removed=[]),
    ]  # fmt: skip
    assert not any("class_version" in json.loads(s.state) for s in stored)
    async with database.pool.acquire() as conn:
        await database.store.append_stored(conn, tenant.tenant_id, stored)

    reports = {r.name: r for r in await rebuild_all(database)}
    added = {d.table: d.added for n in ("users", "groups") for d in reports[n].diffs}
    assert added == {"scim_users": 1, "scim_groups": 1, "scim_group_members": 1}
    user = await api.ok(200, "GET", f"Users/{user_id}")
    assert user["emails"] == [{"primary": True, "type": "work", "value": "kim@contoso.com"}]
    assert user["meta"]["version"] == 'W/"2"'
    group = await api.ok(200, "GET", f"Groups/{group_id}")
    members = [(m["value"], m["type"], m.get("display")) for m in group["members"]]
    assert members == [(str(user_id), "User", None)]


@pytest.mark.parametrize("stage", ["replay", "swap"])
async def test_interrupted_rebuild_leaves_the_live_view_and_can_run_again(
    api: Scim, database: Database, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    await workload(api, random.Random(7), n=10)
    await settle(database)
    before, oids = await snapshot(database), await table_oids(database)
    apply = Rebuilder._apply
    seen: list[bool] = []

    async def failing_apply(self: Rebuilder, conn: Any, batch: Sequence[RecordedEvent]) -> None:
        # The shadow exists, partly built, when the second batch fails.
        seen.append(len(await leftover_shadows(database)) == len(self.tables))
        if len(seen) > 1:
            raise RuntimeError("interrupted")
        await apply(self, conn, batch)

    async def failing_record_state(*_: Any, **__: Any) -> None:
        seen.append(True)
        raise RuntimeError("interrupted")

    if stage == "replay":
        monkeypatch.setattr(Rebuilder, "_apply", failing_apply)
    else:  # after the live tables were dropped and renamed, inside the swap's transaction
        monkeypatch.setattr(state, "record_state", failing_record_state)
    for projection in PROJECTIONS.values():
        seen.clear()
        with pytest.raises(RuntimeError, match="interrupted"):
            await Rebuilder(database, projection, batch_size=5).run()
        assert seen and all(seen)
        assert await snapshot(database) == before
        assert await table_oids(database) == oids
        assert await leftover_shadows(database) == []
    monkeypatch.undo()

    for report in await rebuild_all(database, batch_size=5):
        assert report.swapped and not report.drift, report.diffs
    assert await snapshot(database) == before


async def test_cli_status_verify_and_rebuild(api: Scim, database: Database, fresh_dsn: str) -> None:
    await workload(api, random.Random(3), n=6)
    await settle(database)

    def cli(*args: str) -> Any:
        return run("projections", *args, "--database-url", fresh_dsn)

    code, out, err = await cli("status", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in map(json.loads, out.splitlines())}
    assert set(rows) == set(PROJECTIONS) and {"users", "groups"} <= set(rows)
    head = await database.store.head()
    for name, row in rows.items():
        assert (row["version"], row["stored_version"]) == (PROJECTIONS[name].version,) * 2
        assert (row["checkpoint"], row["events_behind"], row["needs_rebuild"]) == (head, 0, False)

    code, out, err = await cli("verify", "--all", "--quiet")
    assert code == 0 and out.strip().splitlines()[-1] == "no drift", (out, err)

    victim = await database.pool.fetchrow("SELECT id, user_name, display_name FROM scim_users")
    assert victim is not None
    sql = "UPDATE scim_users SET display_name = 'tampered' WHERE id = $1"
    await database.pool.execute(sql, victim["id"])
    code, out, err = await cli("verify", "users", "--quiet")
    assert code == 1, (out, err)
    assert "1 changed" in out and f"user {victim['user_name']!r}" in out and "display_name" in out
    assert err.strip() == "scimledger: error: drift in users"

    code, out, err = await cli("rebuild", "users", "--quiet")
    assert code == 0 and "swapped in" in out, err
    sql = "SELECT display_name FROM scim_users WHERE id = $1"
    assert await database.pool.fetchval(sql, victim["id"]) == victim["display_name"] != "tampered"
    sql = "SELECT rebuilt_at FROM projection_state WHERE name = 'users'"
    assert await database.pool.fetchval(sql) is not None

    code, out, err = await cli("rebuild", "--dry-run", "--all", "--quiet")
    assert code == 0 and out.count("not swapped (dry run)") == len(PROJECTIONS), err

    for args in (("rebuild",), ("rebuild", "nosuch"), ("rebuild", "users", "--all")):
        code, out, err = await cli(*args)
        assert code == 2, (args, out, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("scimledger: error: ")


async def test_cli_rebuild_all_side_by_side_and_one_failing(
    api: Scim, database: Database, fresh_dsn: str
) -> None:
    """`rebuild --all` runs the projections in processes of their own: each swaps its view in
    (rows equal to before), and one that fails is named, exit 1, its live view untouched, while
    the others still finish."""
    await workload(api, random.Random(11), n=8)
    await settle(database)
    before = await snapshot(database)
    oids = await table_oids(database)

    def cli(*args: str) -> Any:
        return run("projections", *args, "--quiet", "--database-url", fresh_dsn)

    code, out, err = await cli("rebuild", "--all", "--jobs", "4")
    assert code == 0, (out, err)
    lines = [line for line in out.splitlines() if " events in " in line]
    assert [line.split(":")[0] for line in lines] == list(PROJECTIONS)
    assert all(line.endswith("swapped in") and "peak RSS" in line for line in lines), out
    assert await snapshot(database) == before
    oids = await table_oids(database)

    # A view where the audit shadow goes: its worker fails on creating the shadow.
    await database.pool.execute("CREATE VIEW audit_entries__rebuild AS SELECT 1 AS x")
    try:
        code, out, err = await cli("rebuild", "--all", "--jobs", "2")
    finally:
        await database.pool.execute("DROP VIEW audit_entries__rebuild")
    assert code == 1, (out, err)
    assert err.startswith("scimledger: error: audit failed (live view untouched): ")
    assert len(err.strip().splitlines()) == 1, err
    swapped = [line.split(":")[0] for line in out.splitlines() if line.endswith("swapped in")]
    assert swapped == [p for p in PROJECTIONS if p != "audit"]
    after = await table_oids(database)
    assert {t: o for t, o in after.items() if t.startswith("audit_")} == {
        t: o for t, o in oids.items() if t.startswith("audit_")
    }
    assert await snapshot(database) == before
    assert await leftover_shadows(database) == []


async def test_names_freed_and_taken_again_while_the_rebuild_catches_up(
    api: Scim, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entra deletes a user and provisions it again under the same userName, or swaps two
    names through a third: each commit was unique, and so must the replay be, batch or not."""

    ok = api.ok
    people = [(await ok(201, "POST", "Users", entra_user(f"p{i}@x.org")))["id"] for i in range(3)]
    teams = [(await ok(201, "POST", "Groups", group_body(f"T{i}")))["id"] for i in range(3)]
    index_shadow = rebuild.index_shadow

    async def then_write(conn: Any, table: str) -> None:
        await index_shadow(conn, table)
        if table == "scim_users":
            await ok(204, "DELETE", f"Users/{people[0]}")
            await ok(201, "POST", "Users", entra_user("p0@x.org"))
            for uid, value in ((people[1], "tmp@x.org"), (people[2], "p1@x.org")):
                await ok(200, "PATCH", f"Users/{uid}", set_("userName", value))
            await ok(200, "PATCH", f"Users/{people[1]}", set_("userName", "p2@x.org"))
        if table == "scim_groups":
            await ok(204, "DELETE", f"Groups/{teams[0]}")
            await ok(201, "POST", "Groups", group_body("T0"))
            for gid, value in ((teams[1], "tmp"), (teams[2], "T1"), (teams[1], "T2")):
                await ok(204, "PATCH", f"Groups/{gid}", set_("displayName", value))

    monkeypatch.setattr(rebuild, "index_shadow", then_write)
    for projection in PROJECTIONS.values():
        report = await Rebuilder(database, projection).run()
        assert report.swapped and not report.drift, report.diffs
    monkeypatch.undo()
    users_now = await database.pool.fetch("SELECT user_name FROM scim_users ORDER BY 1")
    assert [r["user_name"] for r in users_now] == ["p0@x.org", "p1@x.org", "p2@x.org"]
    for report in await rebuild_all(database, dry_run=True):
        assert not report.drift, report.diffs
