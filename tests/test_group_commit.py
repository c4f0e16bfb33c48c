"""Group commit of POST /Users (service/group_commit.py): concurrent requests share one
transaction, each keeps its own outcome, its own provisioning-log entry and its own error."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

from domain.request import ProvisioningRequest
from domain.user import User
from infra.database import Database
from infra.tenants import IssuedToken
from projections.rebuild import Rebuilder
from projections.registry import PROJECTIONS
from service import group_commit
from tests.conftest import database_on
from tests.test_audit import audit_auth, settled
from tests.test_entra_users import create, entra_user, headers
from tests.test_projections import settle

Client = TestClient[Any, Any]
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"


async def _post(client: Client, auth: dict[str, str], name: str) -> tuple[int, Any, str]:
    r = await client.post("/scim/v2/Users", json=entra_user(name), headers=headers(auth))
    return r.status, await r.json(content_type=None), r.headers["X-Request-Id"]


async def test_concurrent_posts_commit_together_and_fail_alone(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    reader = await audit_auth(database)
    await create(client, auth, user_name="taken@contoso.com")
    # 48 at once: 36 distinct names, 6 names asked twice (one of each pair wins), and 6 posts
    # of a name a committed user holds.
    names = [f"u{i}@contoso.com" for i in range(36)]
    names += [f"twice{i}@contoso.com" for i in range(6) for _ in range(2)]
    names += ["TAKEN@contoso.com"] * 6
    replies = await asyncio.gather(*(_post(client, auth, n) for n in names))

    answered = [(n, *reply) for n, reply in zip(names, replies, strict=True)]
    created = [(n, body, rid) for n, status, body, rid in answered if status == 201]
    refused = [(n, body, rid) for n, status, body, rid in answered if status != 201]
    assert {s for s, _, _ in replies} == {201, 409}
    for _, body, _ in refused:
        assert body["schemas"] == [ERROR] and body["scimType"] == "uniqueness", body
    assert sorted(n for n, _, _ in created) == sorted(
        [*names[:36], *(f"twice{i}@contoso.com" for i in range(6))]
    )
    assert sorted(n.lower() for n, _, _ in refused) == sorted(
        [*(f"twice{i}@contoso.com" for i in range(6)), *["taken@contoso.com"] * 6]
    )
    # Every 201 is readable, as it was answered.
    for name, body, _ in created:
        r = await client.get(f"/scim/v2/Users/{body['id']}", headers=auth)
        assert r.status == 200 and (await r.json(content_type=None))["userName"] == name
    assert await database.pool.fetchval("SELECT count(*) FROM scim_users") == 1 + 42

    # They were committed together: some transaction holds several requests' users.
    shared = await database.pool.fetchval(
        "SELECT max(n) FROM (SELECT count(DISTINCT request_id) AS n FROM stored_events"
        " WHERE topic LIKE 'domain.user:%' GROUP BY transaction_id) t"
    )
    assert shared > 1, "no two POSTs were committed in one transaction"

    # One provisioning-log entry per request, with its outcome.
    body = await settled(client, reader)
    entries = {e["changeId"]: e for e in body["entries"]}
    for _, reply, rid in created:
        entry = entries[rid]
        assert entry["provisioningStatusInfo"]["status"] == "success"
        assert entry["provisioningAction"] == "create"
        assert entry["targetIdentity"]["id"] == reply["id"]
        assert sorted(e["type"] for e in entry["events"]) == ["RequestRecorded", "UserProvisioned"]
    for _, _, rid in refused:
        entry = entries[rid]
        assert entry["provisioningStatusInfo"]["status"] == "failure"
        assert entry["provisioningStatusInfo"]["errorInformation"]["errorCode"] == "EntryConflict"
        assert [e["type"] for e in entry["events"]] == ["RequestRecorded"]
    assert len(body["entries"]) == 1 + len(names)

    # A rebuild of the views and of the log makes the same rows.
    await settle(database)
    for name in ("users", "audit"):
        report = await Rebuilder(database, PROJECTIONS[name]).run(dry_run=True)
        assert not report.drift, (name, report.diffs)


async def test_posts_appended_by_another_borrow_no_connection(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    """A POST's unit of work borrows a connection at its first statement, its append: one
    appended in another request's batch borrows none. With a single connection free, eight
    concurrent POSTs still commit together (each holding one from the start, they would take
    turns on it, each alone)."""
    pool = database.pool
    held = [await pool.acquire() for _ in range(pool.get_max_size() - 1)]
    try:
        names = [f"one-conn{i}@contoso.com" for i in range(8)]
        replies = await asyncio.gather(*(_post(client, auth, n) for n in names))
    finally:
        for conn in held:
            await pool.release(conn)
    assert [status for status, _, _ in replies] == [201] * len(names)
    shared = await database.pool.fetchval(
        "SELECT max(n) FROM (SELECT count(DISTINCT request_id) AS n FROM stored_events"
        " WHERE topic LIKE 'domain.user:%' GROUP BY transaction_id) t"
    )
    assert shared > 1, "no two POSTs were committed in one transaction"


async def test_a_request_alone_is_appended_alone(
    client: Client, auth: dict[str, str], database: Database
) -> None:
    """No batch, no waiting: a POST that finds no flush in flight has its own transaction,
    with exactly its own events."""
    user = await create(client, auth)
    rows = await database.pool.fetch(
        "SELECT request_id, count(*) AS n FROM stored_events WHERE transaction_id ="
        " (SELECT transaction_id FROM stored_events WHERE originator_id = $1) GROUP BY 1",
        uuid.UUID(user["id"]),
    )
    assert len(rows) == 1 and rows[0]["n"] == 2


async def test_turned_off_each_request_has_its_own_transaction(
    fresh_dsn: str, tenant: IssuedToken, database: Database
) -> None:
    async with database_on(fresh_dsn) as db:
        db.group_commit = False
        await asyncio.gather(*(_append_user(db, tenant, f"off{i}@x.com") for i in range(12)))
        per_transaction = await db.pool.fetchval(
            "SELECT max(n) FROM (SELECT count(DISTINCT request_id) AS n FROM stored_events"
            " GROUP BY transaction_id) t"
        )
        assert per_transaction == 1


async def _append_user(db: Database, tenant: IssuedToken, name: str) -> None:
    from service.unit_of_work import UnitOfWork

    async with UnitOfWork(db, tenant.tenant_id, f"r-{name}") as uow:
        uow.add_user(User.provision(uuid.uuid4(), tenant.tenant_id, entra_user(name)))
        await uow.flush()


def _events(tenant: IssuedToken, name: str) -> tuple[User, list[Any]]:
    user = User.provision(uuid.uuid4(), tenant.tenant_id, entra_user(name))
    record = ProvisioningRequest.recorded(uuid.uuid4(), tenant.tenant_id, "success", {})
    return user, [*user.collect_events(), record]


async def test_a_cancelled_waiter_never_stalls_the_others(
    database: Database, tenant: IssuedToken
) -> None:
    """A request cancelled while it waits is never appended, also when the batch is taken
    before its cancellation ran; one cancelled just after it was told to lead leaves the next
    one to lead: nobody waits for a flush that will never come."""
    commits = group_commit.GroupCommit(database.store)
    conns = [await database.pool.acquire() for _ in range(7)]
    tasks: dict[str, asyncio.Task[list[Any]]] = {}

    async def post(name: str, conn: Any) -> list[Any]:
        user, events = _events(tenant, f"{name}@x.com")
        return await commits.append_new_user(conn, tenant.tenant_id, events, name, user)

    async def queued(*names: str) -> list[asyncio.Task[list[Any]]]:
        """Requests waiting behind a flush in flight (another request's), in queue order."""
        commits._busy = True
        for name in names:
            tasks[name] = asyncio.create_task(post(name, conns[len(tasks)]))
        for _ in range(1000):
            if len(commits._queue) == len(names):
                break
            await asyncio.sleep(0.01)
        assert len(commits._queue) == len(names)
        return [tasks[str(w.sealed.request_id)] for w in commits._queue]

    try:
        # 1. The second is cancelled in the queue; the fourth is cancelled, but the first
        #    takes the batch before the fourth's cancellation ran: the first and third commit.
        first, second, third, fourth = await queued("a", "b", "c", "d")
        second.cancel()
        await asyncio.sleep(0)
        commits._hand_on()  # the flush in flight ends: the first leads
        fourth.cancel()
        done = await asyncio.gather(first, second, third, fourth, return_exceptions=True)
        assert [isinstance(d, list) for d in done] == [True, False, True, False]
        assert all(isinstance(d, asyncio.CancelledError) for d in (done[1], done[3]))
        assert not commits._busy and not commits._queue
        # 2. The first is told to lead and cancelled before it could: the second leads.
        first, second = await queued("e", "f")
        commits._hand_on()
        first.cancel()
        done = await asyncio.gather(first, second, return_exceptions=True)
        assert isinstance(done[0], asyncio.CancelledError) and isinstance(done[1], list)
        assert not commits._busy and not commits._queue
        tasks["g"] = asyncio.create_task(post("g", conns[6]))  # idle again: appended at once
        assert len(await tasks["g"]) == 2
    finally:
        for conn in conns:
            await database.pool.release(conn)
    committed = {name for name, task in tasks.items() if not task.cancelled()}
    stored = await database.pool.fetchval(
        "SELECT array_agg(request_id ORDER BY request_id) FROM stored_events"
        " WHERE topic LIKE 'domain.user:%'"
    )
    assert stored == sorted(committed) and len(stored) == 4


async def test_a_batch_whose_commit_is_unknown_fails_all_its_requests(
    database: Database, tenant: IssuedToken
) -> None:
    """A batch whose connection dies under it may or may not have committed: its requests all
    get the leader's error (a lone request's outcome then), none is retried alone into a 409
    for a user it created; a batch PostgreSQL refused (a unique value taken) is retried."""
    commits = group_commit.GroupCommit(database.store)
    conns = [await database.pool.acquire() for _ in range(3)]
    tasks: list[asyncio.Task[list[Any]]] = []
    try:
        commits._busy = True  # a flush in flight: the three queue behind it
        for i, conn in enumerate(conns):
            user, events = _events(tenant, f"lost{i}@x.com")
            append = commits.append_new_user(conn, tenant.tenant_id, events, f"lost{i}", user)
            tasks.append(asyncio.create_task(append))
        for _ in range(1000):  # each seals its events first (a query), then queues
            if len(commits._queue) == 3:
                break
            await asyncio.sleep(0.01)
        leader = await commits._queue[0].conn.fetchval("SELECT pg_backend_pid()")
        assert await database.pool.fetchval("SELECT pg_terminate_backend($1, 10000)", leader)
        commits._hand_on()  # the first leads, on its dead connection
        done = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for conn in conns:
            await database.pool.release(conn)
    assert all(isinstance(d, Exception) for d in done), done
    assert len({type(d) for d in done}) == 1  # the same error for each
    assert not group_commit.wrote_nothing(done[0])
    assert not commits._busy and not commits._queue
    stored = await database.pool.fetchval(
        "SELECT count(*) FROM stored_events WHERE request_id LIKE 'lost%'"
    )
    assert stored == 0
    # What PostgreSQL refuses is known not written: such a batch's requests go alone.
    error = None
    async with database.pool.acquire() as conn:
        try:
            await conn.execute("CREATE TEMP TABLE twice (k int PRIMARY KEY)")
            await conn.execute("INSERT INTO twice VALUES (1), (1)")
        except asyncpg.UniqueViolationError as e:
            error = e
    assert error is not None and group_commit.wrote_nothing(error)
