"""Three `scimledger serve` processes on one database, driven at once like Entra drives one.

Every instance runs its own pool and its own projection runners; the database alone keeps
them consistent. Afterwards nothing is duplicated, lost or projected differently from a
rebuild, and each write request has exactly one audit entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
from prometheus_client import REGISTRY

from infra.database import Database
from infra.tenants import IssuedToken
from projections.registry import PROJECTIONS
from projections.state import status
from tests.test_cli import free_port, run
from tests.test_entra_groups import create_group
from tests.test_entra_users import ENTERPRISE, PATCH_OP, entra_user, headers
from tests.test_entra_users import create as create_user
from tests.test_runner import eventually
from tests.test_workers import is_bulk

SCIMLEDGER = str(Path(sys.executable).parent / "scimledger")
SCIM = "application/scim+json"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
LOCK_NAMESPACE = 0x5C1E
GROUP_LOCKS = 0x5C1F  # service/unit_of_work.py


@dataclass
class Instance:
    proc: asyncio.subprocess.Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/scim/v2"


@asynccontextmanager
async def instances(dsn: str, logs: Path, count: int = 3) -> AsyncIterator[list[Instance]]:
    """`count` single-process servers on one database; all stopped (or killed) on the way out."""
    started: list[Instance] = []
    # The test sends each phase at once (hundreds of requests in flight per token): past the
    # per-token cap on requests in flight (tests/test_streams.py tests it).
    env = {
        **os.environ,
        "SCIMLEDGER_RUNNER_STANDBY_INTERVAL": "0.2",
        "SCIMLEDGER_MAX_CONCURRENT_PER_TOKEN": "0",
    }
    try:
        for i in range(count):
            port = free_port()
            proc = await asyncio.create_subprocess_exec(
                SCIMLEDGER,
                "serve",
                "--workers",
                "1",
                "--port",
                str(port),
                "--database-url",
                dsn,
                stdout=asyncio.subprocess.PIPE,
                stderr=(logs / f"instance-{i}.log").open("wb"),  # a pipe would fill up
                env=env,
            )
            started.append(Instance(proc, port))
        for instance in started:
            assert instance.proc.stdout is not None
            line = await asyncio.wait_for(instance.proc.stdout.readline(), 60)
            assert b"Serving SCIM" in line, line
        yield started
    finally:
        for instance in started:
            if instance.proc.returncode is None:
                instance.proc.send_signal(signal.SIGTERM)
        for instance in started:
            await asyncio.wait_for(instance.proc.wait(), 60)


@dataclass
class Sent:
    method: str
    request_id: str
    status: int
    body: Any


class Driver:
    """Sends through any instance, remembers every request, bounded concurrency."""

    def __init__(self, http: aiohttp.ClientSession, token: str) -> None:
        self.http = http
        self.auth = {"Authorization": f"Bearer {token}", "Content-Type": SCIM}
        self.sent: list[Sent] = []
        self.gate = asyncio.Semaphore(24)

    async def __call__(self, instance: Instance, method: str, path: str, body: Any = None) -> Sent:
        async with (
            self.gate,
            self.http.request(method, instance.url + path, json=body, headers=self.auth) as r,
        ):
            text = await r.read()
            parsed = await r.json(content_type=None) if text else None
        # The request's id is the service's own (the change id), from X-Request-Id.
        sent = Sent(method, r.headers["X-Request-Id"], r.status, parsed)
        self.sent.append(sent)
        return sent


def patch_op(*ops: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": list(ops)}


async def caught_up(database: Database) -> None:
    async def behind_none() -> bool:
        rows = await status(database, list(PROJECTIONS.values()))
        return all(r["events_behind"] == 0 for r in rows)

    await eventually(behind_none)


def _instance(pid: int) -> int:
    """The `serve` a session's process belongs to: itself, or the parent of its bulk process
    (where `serve` runs the projection runners, service/bulk.py)."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if is_bulk(proc):
            return proc.ppid()
    return pid


async def leaders(database: Database) -> dict[str, int]:
    """Projection name -> OS pid of the `serve` whose session holds its runner lock."""
    rows = await database.pool.fetch(
        "SELECT l.objid, a.application_name FROM pg_locks l"
        " JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.classid = $1 AND l.granted",
        LOCK_NAMESPACE,
    )
    by_key = {int(r["objid"]): _instance(int(r["application_name"].split(":")[1])) for r in rows}
    names = {}
    for name in ("activity", "audit"):
        key = await database.pool.fetchval("SELECT hashtext($1)::oid", name)
        if int(key) in by_key:
            names[name] = by_key[int(key)]
    assert len(rows) == len(names), rows  # one lock per projection, no other
    return names


async def followers_order(database: Database, stream: str) -> list[int]:
    """A stream's versions in the order followers read them (transaction, then position)."""
    rows = await database.pool.fetch(
        "SELECT originator_version FROM stored_events WHERE originator_id = $1"
        " ORDER BY transaction_id, notification_id",
        uuid.UUID(stream),
    )
    return [r["originator_version"] for r in rows]


async def test_three_instances_under_concurrent_entra_load(
    fresh_dsn: str, database: Database, tenant: IssuedToken, tmp_path: Path
) -> None:
    users = [f"mi.user{i}@contoso.com" for i in range(16)]
    group_names = [f"MI Group {i}" for i in range(3)]
    async with (
        instances(fresh_dsn, tmp_path) as servers,
        aiohttp.ClientSession() as http,
    ):
        send = Driver(http, tenant.token)
        # 1. The same userNames and displayNames created through every instance at once.
        creates = await asyncio.gather(
            *(send(s, "POST", "/Users", entra_user(name)) for name in users for s in servers),
            *(
                send(s, "POST", "/Groups", {"schemas": [GROUP], "displayName": name})
                for name in group_names
                for s in servers
            ),
        )
        assert {c.status for c in creates} == {201, 409}
        won = [c for c in creates if c.status == 201]
        assert sorted(c.body.get("userName") or c.body["displayName"] for c in won) == sorted(
            users + group_names
        )
        for lost in (c for c in creates if c.status == 409):
            assert lost.body["scimType"] == "uniqueness"
        user_ids = [c.body["id"] for c in won if "userName" in c.body]
        group_ids = [c.body["id"] for c in won if c.body.get("schemas") == [GROUP]]
        assert len(user_ids) == len(users) and len(group_ids) == len(group_names)

        # 2. Each user patched by all three instances at once, each on its own attribute; each
        #    group gets every user as a member, one PATCH per member, spread over the instances.
        attributes = ("title", "nickName", f"{ENTERPRISE}:department")
        patches = [
            send(
                servers[i],
                "PATCH",
                f"/Users/{uid}",
                patch_op(
                    {"op": "Replace", "path": attr, "value": f"{attr.split(':')[-1]}-{uid[:8]}"}
                ),
            )
            for uid in user_ids
            for i, attr in enumerate(attributes)
        ]
        adds = [
            send(
                servers[n % len(servers)],
                "PATCH",
                f"/Groups/{gid}",
                patch_op({"op": "Add", "path": "members", "value": [{"value": uid}]}),
            )
            for gid in group_ids
            for n, uid in enumerate(user_ids)
        ]
        results = await asyncio.gather(*patches, *adds)
        assert all(r.status in (200, 204) for r in results), [
            (r.status, r.body) for r in results if r.status not in (200, 204)
        ]

        # No lost update: every instance's change is there, read back through another one.
        for n, uid in enumerate(user_ids):
            got = await send(servers[(n + 1) % 3], "GET", f"/Users/{uid}")
            assert got.status == 200
            assert got.body["title"] == f"title-{uid[:8]}"
            assert got.body["nickName"] == f"nickName-{uid[:8]}"
            assert got.body[ENTERPRISE]["department"] == f"department-{uid[:8]}"
        for n, gid in enumerate(group_ids):
            got = await send(servers[n % 3], "GET", f"/Groups/{gid}")
            assert got.status == 200
            assert sorted(m["value"] for m in got.body["members"]) == sorted(user_ids)

        # Exactly one runner per asynchronous projection across the three instances.
        before = await leaders(database)
        assert set(before) == {"activity", "audit"}
        assert set(before.values()) <= {s.proc.pid for s in servers}
        await caught_up(database)

        # 3. The instance leading the activity projection dies (SIGKILL: no goodbye); a
        #    standby elsewhere takes the lead within about SCIMLEDGER_RUNNER_STANDBY_INTERVAL.
        killed = next(s for s in servers if s.proc.pid == before["activity"])
        killed.proc.send_signal(signal.SIGKILL)
        await killed.proc.wait()
        t0 = time.monotonic()

        async def taken_over() -> bool:
            now = await leaders(database)
            return set(now) == {"activity", "audit"} and killed.proc.pid not in now.values()

        await eventually(taken_over)
        print(f"runner takeover after SIGKILL: {time.monotonic() - t0:.2f}s")  # not asserted
        survivors = [s for s in servers if s is not killed]
        assert set((await leaders(database)).values()) <= {s.proc.pid for s in survivors}
        # The new leaders project what is written after the kill.
        late = await send(survivors[0], "POST", "/Users", entra_user("after.kill@contoso.com"))
        assert late.status == 201
        users.append("after.kill@contoso.com")
        await caught_up(database)

    pool = database.pool
    # Unique per tenant: one row per userName and per displayName.
    assert await pool.fetchval(
        "SELECT count(*) FROM scim_users WHERE tenant_id = $1", tenant.tenant_id
    ) == len(users)
    assert await pool.fetchval(
        "SELECT count(*) FROM scim_groups WHERE tenant_id = $1", tenant.tenant_id
    ) == len(group_names)
    # The activity view counted every user once, across the failover.
    assert await pool.fetchval(
        "SELECT users FROM tenant_activity WHERE tenant_id = $1", tenant.tenant_id
    ) == len(users)
    # Every 2xx write is in the store, with its domain events.
    writes = [s for s in send.sent if s.method != "GET"]
    stored = {
        r["request_id"]
        for r in await pool.fetch(
            "SELECT DISTINCT request_id FROM stored_events WHERE topic NOT LIKE 'domain.request:%'"
        )
    }
    assert {s.request_id for s in writes if s.status < 300} <= stored
    assert not {s.request_id for s in writes if s.status >= 400} & stored
    # One audit entry per write request, 2xx or not.
    entries = await pool.fetch(
        "SELECT change_id, count(*) AS n FROM audit_entries WHERE tenant_id = $1"
        " GROUP BY change_id",
        tenant.tenant_id,
    )
    assert {r["change_id"]: r["n"] for r in entries} == {s.request_id: 1 for s in writes}
    # Every projection equals a rebuild from the events.
    code, out, err = await run(
        "projections", "verify", "--all", "--quiet", "--database-url", fresh_dsn
    )
    assert code == 0, out + err
    assert "no drift" in out


async def test_concurrent_writers_to_one_group_reach_followers_in_version_order(
    client: Any, auth: dict[str, str], database: Database
) -> None:
    """Entra adds members one PATCH at a time, many at once. The followers' order is the
    writers' transaction ids; a writer that took its id before waiting for the group's row
    lock used to land before earlier versions, and the audit projection stopped on it."""
    users = [await create_user(client, auth, user_name=f"order{i}@contoso.com") for i in range(40)]
    group = await create_group(client, auth)

    async def add(user: dict[str, Any]) -> None:
        r = await client.patch(
            f"/scim/v2/Groups/{group['id']}",
            headers=headers(auth),
            json=patch_op({"op": "Add", "path": "members", "value": [{"value": user["id"]}]}),
        )
        assert r.status == 204, await r.text()

    await asyncio.gather(*(add(u) for u in users))
    versions = await followers_order(database, group["id"])
    assert versions == list(range(1, 42))
    await caught_up(database)
    rows = await status(database, list(PROJECTIONS.values()))
    assert all(r["last_error"] is None for r in rows), rows


async def test_a_deletion_that_waits_for_a_group_writes_it_in_version_order(
    client: Any, auth: dict[str, str], database: Database
) -> None:
    """Arranged with the group's lock: a member add queues for it, then the deletion of a member
    of the group queues behind it. The deletion used to lock the user's row (and so take its
    transaction id) before queueing, and then wrote the group's next version under an id older
    than the add's: [1, 2, 4, 3] in the followers' order."""
    leaving = await create_user(client, auth, user_name="leaving@contoso.com")
    joining = await create_user(client, auth, user_name="joining@contoso.com")
    group = await create_group(client, auth)
    members = patch_op({"op": "Add", "path": "members", "value": [{"value": leaving["id"]}]})
    r = await client.patch(f"/scim/v2/Groups/{group['id']}", headers=headers(auth), json=members)
    assert r.status == 204
    holder = await asyncpg.connect(database.dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1, hashtext($2))", GROUP_LOCKS, group["id"])

        async def queued(n: int) -> None:
            async def waiting() -> bool:
                count = await holder.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND classid = $1 AND NOT granted",
                    GROUP_LOCKS,
                )
                return bool(count == n)

            await eventually(waiting)

        add = asyncio.create_task(
            client.patch(
                f"/scim/v2/Groups/{group['id']}",
                headers=headers(auth),
                json=patch_op(
                    {"op": "Add", "path": "members", "value": [{"value": joining["id"]}]}
                ),
            )
        )
        await queued(1)
        delete = asyncio.create_task(client.delete(f"/scim/v2/Users/{leaving['id']}", headers=auth))
        await queued(2)
        await holder.execute(
            "SELECT pg_advisory_unlock($1, hashtext($2))", GROUP_LOCKS, group["id"]
        )
        assert (await add).status == 204
        assert (await delete).status == 204
    finally:
        await holder.close()
    versions = await followers_order(database, group["id"])
    assert versions == sorted(versions)


async def test_a_deletion_starts_again_when_its_user_joins_a_group_meanwhile(
    client: Any, auth: dict[str, str], database: Database
) -> None:
    """The deletion queued for the user's groups as they were; the user joined another before
    the deletion locked it. It starts again (a retry) and leaves both groups in order."""
    leaving = await create_user(client, auth, user_name="leaving@contoso.com")
    first = await create_group(client, auth, name="First")
    second = await create_group(client, auth, name="Second")

    async def join(group: dict[str, Any]) -> None:
        body = patch_op({"op": "Add", "path": "members", "value": [{"value": leaving["id"]}]})
        r = await client.patch(f"/scim/v2/Groups/{group['id']}", headers=headers(auth), json=body)
        assert r.status == 204

    await join(first)
    retries_before = REGISTRY.get_sample_value("scimledger_write_retries_total")
    holder = await asyncpg.connect(database.dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1, hashtext($2))", GROUP_LOCKS, first["id"])
        delete = asyncio.create_task(client.delete(f"/scim/v2/Users/{leaving['id']}", headers=auth))

        async def deletion_queued() -> bool:
            return bool(
                await holder.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND classid = $1 AND NOT granted",
                    GROUP_LOCKS,
                )
            )

        await eventually(deletion_queued)
        await join(second)  # not held: commits while the deletion waits
        await holder.execute(
            "SELECT pg_advisory_unlock($1, hashtext($2))", GROUP_LOCKS, first["id"]
        )
        assert (await delete).status == 204
    finally:
        await holder.close()
    assert REGISTRY.get_sample_value("scimledger_write_retries_total") == retries_before + 1
    for group in (first, second):
        r = await client.get(f"/scim/v2/Groups/{group['id']}", headers=auth)
        assert r.status == 200 and not (await r.json(content_type=None)).get("members")
        versions = await followers_order(database, group["id"])
        assert versions == [1, 2, 3]  # created, joined, left
