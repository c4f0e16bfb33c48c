"""The event store against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from eventsourcing.persistence import StoredEvent

from domain.user import User
from infra.database import Database
from infra.eventstore import (
    START,
    ConcurrencyError,
    EventStore,
    OutOfOrder,
    Position,
    RecordedEvent,
)
from infra.transcoder import OrjsonTranscoder
from service.unit_of_work import UnitOfWork

TENANT = uuid.UUID("00000000-0000-0000-0000-0000000000aa")


def stored(stream: uuid.UUID, version: int, payload: object = None) -> StoredEvent:
    state = OrjsonTranscoder().encode({"payload": payload, "at": datetime.now(UTC)})
    return StoredEvent(stream, version, "tests.events:Something", state)


def test_transcoder_round_trips_uuid_and_datetime() -> None:
    t = OrjsonTranscoder()
    value = {
        "id": uuid.uuid4(),
        "when": datetime(2026, 11, 28, 12, 30, 1, 123456, tzinfo=UTC),
        "nested": [{"ids": [uuid.uuid4()]}, None, 1.5, "x"],
    }
    assert t.decode(t.encode(value)) == value


async def test_append_and_read_stream(database: Database) -> None:
    store = database.store
    stream = uuid.uuid4()
    async with database.pool.acquire() as conn, conn.transaction():
        recorded = await store.append_stored(
            conn, TENANT, [stored(stream, 1, "a"), stored(stream, 2, "b")], request_id="req-1"
        )
    assert [r.originator_version for r in recorded] == [1, 2]
    assert recorded[0].notification_id < recorded[1].notification_id
    back = await store.read_stream(database.pool, stream)
    assert [(r.originator_version, r.request_id, r.tenant_id) for r in back] == [
        (1, "req-1", TENANT),
        (2, "req-1", TENANT),
    ]
    assert [OrjsonTranscoder().decode(r.state)["payload"] for r in back] == ["a", "b"]
    assert await store.read_stream(database.pool, stream, after_version=1) == back[1:]


async def test_same_version_twice_is_a_concurrency_error(database: Database) -> None:
    store = database.store
    stream = uuid.uuid4()
    async with database.pool.acquire() as conn, conn.transaction():
        await store.append_stored(conn, TENANT, [stored(stream, 1)])
    with pytest.raises(ConcurrencyError) as caught:
        async with database.pool.acquire() as conn, conn.transaction():
            await store.append_stored(conn, TENANT, [stored(stream, 1, "other")])
    assert caught.value.originator_id == stream
    assert len(await store.read_stream(database.pool, stream)) == 1


async def test_racing_writers_on_one_stream_exactly_one_wins(database: Database) -> None:
    """Two open transactions append version 2: the second blocks, then fails; none merges."""
    store = database.store
    stream = uuid.uuid4()
    async with database.pool.acquire() as conn, conn.transaction():
        await store.append_stored(conn, TENANT, [stored(stream, 1)])

    first_inserted = asyncio.Event()
    release_first = asyncio.Event()

    async def first() -> None:
        async with database.pool.acquire() as conn, conn.transaction():
            await store.append_stored(conn, TENANT, [stored(stream, 2, "first")])
            first_inserted.set()
            await release_first.wait()

    async def second() -> None:
        await first_inserted.wait()
        async with database.pool.acquire() as conn, conn.transaction():
            await store.append_stored(conn, TENANT, [stored(stream, 2, "second")])

    t1 = asyncio.create_task(first())
    t2 = asyncio.create_task(second())
    await first_inserted.wait()
    await asyncio.sleep(0.2)
    assert not t2.done(), "the second writer must wait for the first to commit or roll back"
    release_first.set()
    await t1
    with pytest.raises(ConcurrencyError):
        await t2
    versions = await store.read_stream(database.pool, stream)
    assert [OrjsonTranscoder().decode(r.state)["payload"] for r in versions] == [None, "first"]


async def test_a_stream_is_never_appended_below_its_previous_transaction(
    database: Database,
) -> None:
    """A writer whose transaction id was taken before the stream's previous version was
    written (it waited on a lock meanwhile) would put its event first in the followers' order:
    its append fails whole, a view change made in the same statement included; in a new
    transaction it succeeds, in order."""
    store = database.store
    stream = uuid.uuid4()
    async with database.pool.acquire() as conn, conn.transaction():
        await store.append_stored(conn, TENANT, [stored(stream, 1, "v1")])

    async def late(append: Any) -> None:
        async with database.pool.acquire() as early, database.pool.acquire() as other:
            with pytest.raises(OutOfOrder) as raised:
                async with early.transaction():
                    await early.fetchval("SELECT pg_current_xact_id()")  # takes its id now
                    async with other.transaction():
                        version = await other.fetchval(
                            "SELECT max(originator_version) FROM stored_events"
                            " WHERE originator_id = $1",
                            stream,
                        )
                        await store.append_stored(other, TENANT, [stored(stream, version + 1)])
                    await append(early, version + 2)
            assert isinstance(raised.value, ConcurrencyError)
            assert raised.value.originator_id == stream
            async with early.transaction():
                await append(early, version + 2)

    await late(lambda conn, v: store.append_stored(conn, TENANT, [stored(stream, v)]))
    back = await store.read_stream(database.pool, stream)
    assert [r.originator_version for r in back] == [1, 2, 3]
    order = [r for r in await store.read_all(START, 100) if r.originator_id == stream]
    assert [r.originator_version for r in order] == [1, 2, 3]
    assert [r.transaction_id for r in order] == sorted(r.transaction_id for r in order)
    # Several versions of one stream in one append, and a new stream: no predecessor to check.
    fresh = uuid.uuid4()
    async with database.pool.acquire() as conn, conn.transaction():
        rows = await store.append_stored(conn, TENANT, [stored(fresh, 1), stored(fresh, 2)])
    assert [r.originator_version for r in rows] == [1, 2]


async def test_a_late_one_statement_write_leaves_neither_events_nor_view_row(
    database: Database,
) -> None:
    """The same for a user write whose events and view row go in one statement (append_with):
    it fails whole, and the retry in a new transaction applies it after the rival's."""
    user = User.provision(uuid.uuid4(), TENANT, {"userName": "kim@contoso.com"})
    async with UnitOfWork(database, TENANT, "r1") as uow:
        uow.add_user(user)
        await uow.flush()
    with pytest.raises(OutOfOrder):
        async with UnitOfWork(database, TENANT, "late") as uow:
            await (await uow.begin()).fetchval("SELECT pg_current_xact_id()")  # its id, now
            async with UnitOfWork(database, TENANT, "rival") as rival:
                theirs = await rival.user(user.id)
                assert theirs is not None
                theirs.update({**theirs.state, "displayName": "Two"})
                await rival.flush()
            mine = await uow.user(user.id)
            assert mine is not None and mine.version == 2
            mine.update({**mine.state, "displayName": "Three"})
            await uow.flush()
    sql = "SELECT display_name, version FROM scim_users WHERE id = $1"
    assert tuple(await database.pool.fetchrow(sql, user.id)) == ("Two", 2)
    assert len(await database.store.read_stream(database.pool, user.id)) == 2
    async with UnitOfWork(database, TENANT, "again") as uow:
        mine = await uow.user(user.id)
        assert mine is not None
        mine.update({**mine.state, "displayName": "Three"})
        await uow.flush()
    assert tuple(await database.pool.fetchrow(sql, user.id)) == ("Three", 3)


async def test_read_all_hides_events_of_an_open_transaction(database: Database) -> None:
    """A lower notification_id that commits late is never behind a follower's position."""
    store = database.store
    a, b = uuid.uuid4(), uuid.uuid4()
    slow = await asyncpg.connect(database.dsn)
    try:
        tx = slow.transaction()
        await tx.start()
        # The slow writer draws the lower notification_id ...
        low = await store.append_stored(slow, TENANT, [stored(a, 1)])
        # ... a fast writer draws a higher one and commits first.
        async with database.pool.acquire() as conn, conn.transaction():
            high = await store.append_stored(conn, TENANT, [stored(b, 1)])
        assert low[0].notification_id < high[0].notification_id
        # While the slow one is open, the follower sees nothing: not even the committed event,
        # since reading it would move the position past the slow one's.
        assert await store.read_all(START) == []
        await tx.commit()
    finally:
        await slow.close()
    seen = await store.read_all(START)
    assert {e.originator_id for e in seen} == {a, b}


async def test_follower_misses_nothing_under_concurrent_writers(database: Database) -> None:
    """8 writers, 10,000+ events, transactions of random length; one follower reading along.

    Every event is delivered exactly once, each stream in version order, positions strictly
    increasing: the follower never skips an event whose transaction committed late.
    """
    store = database.store
    writers, events_per_writer = 8, 1300
    rng = random.Random(20261128)
    streams = [uuid.uuid4() for _ in range(40)]
    next_version: dict[uuid.UUID, int] = defaultdict(int)
    # A writer holds its stream's lock for the whole transaction, as a real writer has read the
    # stream's head before appending to it; writers on different streams run in parallel.
    stream_locks = {s: asyncio.Lock() for s in streams}
    appended: list[tuple[uuid.UUID, int]] = []
    done = asyncio.Event()

    async def writer(seed: int) -> None:
        wrng = random.Random(seed)
        written = 0
        async with database.pool.acquire() as conn:
            while written < events_per_writer:
                n = wrng.randint(1, 5)
                stream = wrng.choice(streams)
                async with stream_locks[stream], conn.transaction():
                    first = next_version[stream] + 1
                    batch = [stored(stream, first + i) for i in range(n)]
                    await store.append_stored(conn, TENANT, batch)
                    # Hold some transactions open so lower positions commit after higher ones.
                    if wrng.random() < 0.3:
                        await asyncio.sleep(wrng.random() * 0.01)
                next_version[stream] += n
                appended.extend((stream, first + i) for i in range(n))
                written += n

    seen: list[RecordedEvent] = []

    async def follower() -> None:
        position: Position = START
        while True:
            finished = done.is_set()
            batch = await store.read_all(position, limit=rng.randint(50, 500))
            if batch:
                position = batch[-1].position
                seen.extend(batch)
            elif finished:
                return
            else:
                await asyncio.sleep(0.005)

    follow_task = asyncio.create_task(follower())
    await asyncio.gather(*(writer(i) for i in range(writers)))
    done.set()
    await follow_task

    assert len(appended) >= 10_000
    keys = [(e.originator_id, e.originator_version) for e in seen]
    assert len(keys) == len(set(keys)), "an event was delivered twice"
    assert set(keys) == set(appended), f"{len(set(appended) - set(keys))} events missed"
    # The workload really did commit lower notification_ids after higher ones (otherwise this
    # test would prove nothing): delivery order differs from notification_id order.
    late = sum(1 for a, b in itertools.pairwise(seen) if b.notification_id < a.notification_id)
    assert late > 0
    positions = [e.position for e in seen]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    per_stream: dict[uuid.UUID, list[int]] = defaultdict(list)
    for e in seen:
        per_stream[e.originator_id].append(e.originator_version)
    for versions in per_stream.values():
        assert versions == list(range(1, len(versions) + 1)), "a stream was delivered out of order"


async def test_notify_wakes_a_follower_without_polling(database: Database) -> None:
    store = database.store
    stream = uuid.uuid4()
    # Polling once an hour: only NOTIFY can deliver the event within the timeout.
    follower = store.follow(START, poll_interval=3600, dsn_connect=database.connect)
    first = asyncio.ensure_future(follower.__anext__())
    await asyncio.sleep(0.3)  # the follower has read an empty log and is now listening
    assert not first.done()
    async with database.pool.acquire() as conn, conn.transaction():
        await store.append_stored(conn, TENANT, [stored(stream, 1)])
    store.notify()
    batch = await asyncio.wait_for(first, timeout=30)
    assert [e.originator_id for e in batch] == [stream]
    await follower.aclose()


async def test_load_replays_a_stream_into_an_aggregate(database: Database) -> None:
    from eventsourcing.domain import Aggregate, event

    class Counter(Aggregate):
        @event("Started")
        def __init__(self, name: str) -> None:
            self.name = name
            self.count = 0

        @event("Incremented")
        def increment(self, by: int) -> None:
            self.count += by

    counter = Counter(name="c")
    counter.increment(by=2)
    counter.increment(by=3)
    store = EventStore(database.pool)
    await store.append_now(TENANT, counter.collect_events(), request_id="r")
    loaded = await store.load(database.pool, counter.id)
    assert loaded is not None
    assert (loaded.name, loaded.count, loaded.version) == ("c", 5, 3)
    await store.close()
