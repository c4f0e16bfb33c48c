"""Asynchronous projections: catch-up subscribers with a checkpoint, one active per projection."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from domain.user import User
from infra.database import Database
from projections import activity
from projections.rebuild import Rebuilder
from projections.registry import PROJECTIONS
from projections.runner import Runner
from projections.state import register, status
from tests.test_entra_groups import create_group
from tests.test_entra_users import create as create_user

ACTIVITY = PROJECTIONS["activity"]


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    """Wait for a condition the system must reach; fail if it never does."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


async def counts(database: Database, tenant_id: uuid.UUID) -> tuple[int, int, int, int]:
    row = await database.pool.fetchrow(
        "SELECT users, groups, events FROM tenant_activity WHERE tenant_id = $1", tenant_id
    )
    stored = await database.pool.fetchval(
        "SELECT count(*) FROM stored_events WHERE tenant_id = $1", tenant_id
    )
    return (row["users"], row["groups"], row["events"], stored) if row else (0, 0, 0, stored)


async def append_users(database: Database, tenant_id: uuid.UUID, n: int) -> None:
    for i in range(n):
        user = User.provision(uuid.uuid4(), tenant_id, {"userName": f"r{uuid.uuid4()}@x"})
        if i % 2:
            user.update({**user.state, "displayName": "changed"})
        await database.store.append_now(tenant_id, user.collect_events())


async def test_the_app_keeps_the_activity_view(
    client: TestClient[Any, Any], auth: dict[str, str], database: Database, tenant: Any
) -> None:
    for i in range(3):
        await create_user(client, auth, user_name=f"a{i}@contoso.com")
    await create_group(client, auth)

    async def caught_up() -> bool:
        users, groups, events, stored = await counts(database, tenant.tenant_id)
        return (users, groups, events) == (3, 1, stored)

    await eventually(caught_up)
    rows = {r["name"]: r for r in await status(database, list(PROJECTIONS.values()))}
    assert rows["activity"]["events_behind"] == 0 and rows["activity"]["mode"] == "async"


async def test_one_active_runner_and_failover_without_double_counting(database: Database) -> None:
    tenant_id = uuid.uuid4()
    async with database.pool.acquire() as conn:
        await register(conn, [ACTIVITY])
    stop = asyncio.Event()
    runners = [
        Runner(database, ACTIVITY, standby_interval=0.2, poll_interval=0.2) for _ in range(3)
    ]
    tasks = [asyncio.create_task(r.run(stop)) for r in runners]
    try:
        await append_users(database, tenant_id, 20)

        async def one_leader() -> bool:
            return sum(r.active for r in runners) == 1

        await eventually(one_leader)
        leader = next(r for r in runners if r.active)

        async def caught_up() -> bool:
            _, _, events, stored = await counts(database, tenant_id)
            return events == stored

        await eventually(caught_up)
        # Kill the leader's database session, as a crashed instance would lose it.
        await database.pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE locktype = 'advisory' AND classid = $1 AND granted",
            0x5C1E,
        )
        await append_users(database, tenant_id, 20)
        await eventually(caught_up)
        await eventually(one_leader)
        users, _, events, stored = await counts(database, tenant_id)
        assert users == 40 and events == stored  # each event counted exactly once
        assert sum(r.applied for r in runners) == stored
        del leader
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_resumes_from_its_checkpoint_after_a_restart(database: Database) -> None:
    tenant_id = uuid.uuid4()
    async with database.pool.acquire() as conn:
        await register(conn, [ACTIVITY])
    await append_users(database, tenant_id, 10)
    first = Runner(database, ACTIVITY)
    async with database.pool.acquire() as conn:
        assert await first.step(conn) > 0
    await append_users(database, tenant_id, 5)
    second = Runner(database, ACTIVITY)
    async with database.pool.acquire() as conn:
        while await second.step(conn):
            pass
    users, _, events, stored = await counts(database, tenant_id)
    assert users == 15 and events == stored
    assert first.applied + second.applied == stored


async def test_a_failing_handler_keeps_its_checkpoint_and_reports_the_error(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant_id = uuid.uuid4()
    async with database.pool.acquire() as conn:
        await register(conn, [ACTIVITY])
    await append_users(database, tenant_id, 3)

    async def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("handler bug")

    monkeypatch.setattr(activity, "apply", broken)
    stop = asyncio.Event()
    runner = Runner(database, ACTIVITY, poll_interval=0.05)
    task = asyncio.create_task(runner.run(stop))

    async def error_recorded() -> bool:
        rows = {r["name"]: r for r in await status(database, [ACTIVITY])}
        return "handler bug" in (rows["activity"]["last_error"] or "")

    await eventually(error_recorded)
    assert (await counts(database, tenant_id))[2] == 0  # nothing applied, checkpoint kept
    monkeypatch.undo()

    async def recovered() -> bool:
        _, _, events, stored = await counts(database, tenant_id)
        rows = {r["name"]: r for r in await status(database, [ACTIVITY])}
        return events == stored and rows["activity"]["last_error"] is None

    await eventually(recovered)
    stop.set()
    await task


async def test_rebuilding_an_async_projection_while_its_runner_runs(database: Database) -> None:
    tenant_id = uuid.uuid4()
    async with database.pool.acquire() as conn:
        await register(conn, [ACTIVITY])
    stop = asyncio.Event()
    runner = Runner(database, ACTIVITY, poll_interval=0.05)
    task = asyncio.create_task(runner.run(stop))
    try:
        await append_users(database, tenant_id, 30)
        writer = asyncio.create_task(append_users(database, tenant_id, 60))
        report = await Rebuilder(database, ACTIVITY, batch_size=7).run()
        assert report.swapped
        await writer

        async def caught_up() -> bool:
            users, _, events, stored = await counts(database, tenant_id)
            return users == 90 and events == stored

        await eventually(caught_up)
        dry = await Rebuilder(database, ACTIVITY).run(dry_run=True)
        assert not dry.drift
    finally:
        stop.set()
        await task
