"""Append-only event store on asyncpg.

Writers append to a stream with an expected version inside their own transaction (the unit of
work), so the projection rows they change commit with the events or not at all. Two appends to
the same stream at the same version collide on the primary key: the loser gets
`ConcurrencyError`, never a silent merge.

Followers read the whole log in commit-safe order: `(transaction_id, notification_id)`, limited
to transactions older than the oldest one still running. A notification_id drawn by a slow
transaction can commit after a higher one; ordering by the writer's transaction id and stopping
at the snapshot's xmin means such an event is never behind a follower's checkpoint when it
becomes visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy
from eventsourcing.domain import Aggregate, DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent

from infra import eventstore_sql as q
from infra import metrics
from infra.keys import KeyRing, SubjectErased, uuids
from infra.records import START as START
from infra.records import ConcurrencyError as ConcurrencyError
from infra.records import OutOfOrder as OutOfOrder
from infra.records import Position as Position
from infra.records import RecentEvents as RecentEvents
from infra.records import RecordedEvent as RecordedEvent
from infra.records import appended, stream_named
from infra.sealing import SealingMapper, display_members, is_personal_topic

NOTIFY_CHANNEL = "scimledger_events"
NOTIFY_COALESCE_SECONDS = 0.05

# A plain connection or one borrowed from a pool: both run statements the same way.
Conn = asyncpg.Connection | PoolConnectionProxy


APPEND_PARAMETERS = q.APPEND_PARAMETERS


_SUBJECT_ERASED = "domain.erasure:Erasure.SubjectErased"
def _recorded(row: asyncpg.Record) -> RecordedEvent:
    return RecordedEvent(*row)


class EventStore:
    def __init__(
        self, pool: asyncpg.Pool, mapper: Mapper[UUID] | None = None, keys: KeyRing | None = None
    ) -> None:
        self.pool = pool
        if keys is None:
            from infra.config import Settings
            from infra.keys import load_master_key

            keys = KeyRing(load_master_key(Settings().data_dir))
        self.keys = keys
        self.mapper = mapper or SealingMapper(keys)
        self._wake = asyncio.Event()
        self._notifier: asyncio.Task[None] | None = None
        self.recent = RecentEvents()

    # -- writing -----------------------------------------------------------------------------

    async def append(
        self,
        conn: Conn,
        tenant_id: UUID,
        events: Sequence[DomainEventProtocol[UUID]],
        request_id: str | None = None,
    ) -> list[RecordedEvent]:
        """Append domain events in the caller's transaction; nothing is visible until it commits."""
        if not events:
            return []
        new_keys = await self.keys.prepare(conn, tenant_id, events)
        stored = [self.mapper.to_stored_event(e) for e in events]
        sql = q.INSERT_FIRST if _all_first(stored) else q.INSERT
        return await self._insert(conn, sql, stored, tenant_id, request_id, new_keys)

    async def append_stored(
        self,
        conn: Conn,
        tenant_id: UUID,
        stored: Sequence[StoredEvent],
        request_id: str | None = None,
    ) -> list[RecordedEvent]:
        if not stored:
            return []
        sql = q.INSERT_FIRST if _all_first(stored) else q.INSERT
        return await self._insert(conn, sql, stored, tenant_id, request_id, [])

    async def append_with(
        self,
        conn: Conn,
        tenant_id: UUID,
        events: Sequence[DomainEventProtocol[UUID]],
        request_id: str | None,
        statement: str,
        args: Sequence[Any],
    ) -> list[RecordedEvent]:
        """Append and run `statement` (e.g. a view's upsert) in the same SQL statement.

        One round trip; outside an explicit transaction the statement is its own transaction,
        committed (durably) before this returns. A clash on the events' primary key is a
        ConcurrencyError; any other error (a view's unique index) is raised as it is, and
        nothing is written.
        """
        if not events:
            raise ValueError("append_with needs at least one event")
        stored, new_keys = await self.seal(conn, tenant_id, events)
        return await self.append_sealed_with(
            conn, tenant_id, stored, new_keys, request_id, statement, args
        )

    async def seal(
        self,
        conn: Conn | asyncpg.Pool,
        tenant_id: UUID,
        events: Sequence[DomainEventProtocol[UUID]],
    ) -> tuple[list[StoredEvent], list[tuple[UUID, int, bytes]]]:
        """The events as stored (personal ones sealed), and the new subjects' keys that their
        append must store (KeyRing.prepare, which reads the database only for keys it does not
        hold: on `conn`, or the pool)."""
        new_keys = await self.keys.prepare(conn, tenant_id, events)
        return [self.mapper.to_stored_event(e) for e in events], new_keys

    async def append_sealed_with(
        self,
        conn: Conn,
        tenant_id: UUID,
        stored: Sequence[StoredEvent],
        new_keys: Sequence[tuple[UUID, int, bytes]],
        request_id: str | None,
        statement: str,
        args: Sequence[Any],
    ) -> list[RecordedEvent]:
        """`append_with` of events `seal` made (e.g. retried alone after a group commit)."""
        sql = _append_with(statement, first=_all_first(stored))
        return await self._insert(conn, sql, stored, tenant_id, request_id, new_keys, *args)

    async def _insert(
        self,
        conn: Conn,
        sql: str,
        stored: Sequence[StoredEvent],
        tenant_id: UUID,
        request_id: str | None,
        new_keys: Sequence[tuple[UUID, int, bytes]],
        *args: Any,
    ) -> list[RecordedEvent]:
        """Run an append statement (`q.INSERT`, alone or with more); its errors as ours. On any
        failure the new subjects' keys were not stored: they are forgotten (a retry makes new
        ones)."""
        started = time.perf_counter()
        try:
            rows = await conn.fetch(
                sql,
                [s.originator_id for s in stored],
                [s.originator_version for s in stored],
                [s.topic for s in stored],
                [s.state for s in stored],
                tenant_id,
                request_id,
                [k[0] for k in new_keys],
                [k[1] for k in new_keys],
                [k[2] for k in new_keys],
                *args,
            )
        except BaseException as e:
            self.keys.forget(k[0] for k in new_keys)
            ours = self._refusal(stored, e)
            if ours is e:
                raise
            raise ours from None
        finally:
            metrics.APPEND_SECONDS.observe(time.perf_counter() - started)
        metrics.APPENDS.inc()
        metrics.EVENTS_APPENDED.inc(len(rows))
        at = {(oid, v): (oid, n, when, tx) for oid, v, n, when, tx in rows}
        return appended(stored, at, tenant_id, request_id)

    def _refusal(self, stored: Sequence[StoredEvent], error: BaseException) -> BaseException:
        """What a failed append raises: ours for a version conflict, a stream written out of
        order or an erased subject; anything else as it came."""
        if isinstance(error, asyncpg.UniqueViolationError):
            if getattr(error, "constraint_name", None) != q.PRIMARY_KEY:
                return error  # a view's unique index, in the same statement
            metrics.CONFLICTS.labels("version").inc()
            return ConcurrencyError(stream_named(stored, getattr(error, "detail", "") or ""))
        if isinstance(error, asyncpg.PostgresError):
            if error.sqlstate == q.OUT_OF_ORDER:
                metrics.CONFLICTS.labels("order").inc()
                return OutOfOrder(stream_named(stored, str(error)))
            if error.sqlstate == q.ERASED:
                subject = stream_named(stored, str(error))
                self.keys.erased(subject)
                return SubjectErased(subject)
        return error

    async def append_now(
        self,
        tenant_id: UUID,
        events: Sequence[DomainEventProtocol[UUID]],
        request_id: str | None = None,
    ) -> list[RecordedEvent]:
        """Append atomically on its own (one INSERT statement) and wake followers."""
        async with self.pool.acquire() as conn:
            recorded = await self.append(conn, tenant_id, events, request_id)
        self.committed(recorded, events)
        return recorded

    def committed(
        self, recorded: Sequence[RecordedEvent], events: Iterable[DomainEventProtocol[UUID]]
    ) -> None:
        """After the commit of `recorded` (the append of `events`): keep them for this
        process's followers (RecentEvents), and wake the followers."""
        self.recent.remember(recorded, events)
        self.notify()

    def notify(self) -> None:
        """Tell followers there is something new, after the caller's commit.

        NOTIFY inside the appending transaction would take PostgreSQL's global notify lock
        until commit and so serialise every commit (and its fsync). One background task sends
        the NOTIFY instead, coalescing bursts of appends into one message.
        """
        if self._notifier is None or self._notifier.done():
            self._notifier = asyncio.get_running_loop().create_task(self._notify_loop())
        self._wake.set()

    async def _notify_loop(self) -> None:
        while True:
            await self._wake.wait()
            # Let a burst of commits gather: one NOTIFY for all of them, so that followers
            # (the asynchronous projections' runners) read them as one batch rather than one
            # small batch, with its own transaction, per commit.
            await asyncio.sleep(NOTIFY_COALESCE_SECONDS)
            self._wake.clear()
            try:
                async with self.pool.acquire() as conn:
                    await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
                # Followers also poll; a lost wake-up only delays them.
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self._notifier is not None:
            self._notifier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._notifier
            self._notifier = None

    # -- reading -----------------------------------------------------------------------------

    async def read_stream(
        self,
        conn: Conn | asyncpg.Pool,
        originator_id: UUID,
        after_version: int = 0,
        *,
        fresh_keys: bool = True,
    ) -> list[RecordedEvent]:
        """`fresh_keys`: re-read the stream's key row, so an erasure made on another instance
        shows at once (a writer needs not: its append checks the row in the same statement)."""
        rows = await conn.fetch(q.READ_STREAM, originator_id, after_version)
        recorded = [_recorded(r) for r in rows]
        await self.load_keys(conn, recorded, refresh=fresh_keys)
        return recorded

    async def read_stream_until(
        self,
        conn: Conn | asyncpg.Pool,
        tenant_id: UUID,
        originator_id: UUID,
        until: datetime,
        limit: int,
    ) -> list[RecordedEvent]:
        """The first `limit` events of a stream of `tenant_id` recorded at or before `until`
        (a stream of another tenant reads as empty: none of its events is read)."""
        rows = await conn.fetch(q.READ_STREAM_UNTIL, originator_id, tenant_id, until, limit)
        recorded = [_recorded(r) for r in rows]
        await self.load_keys(conn, recorded, refresh=True)
        return recorded

    async def read_all(
        self, after: Position = START, limit: int = 1000, conn: Any = None, *, heads: bool = False
    ) -> list[RecordedEvent]:
        """Committed events after `after`, in commit-safe order; never one that could be skipped.

        A batch ends on a transaction boundary (it may exceed `limit` to get there), so a
        consumer always sees the whole of what one request appended. `heads`: without their
        states (empty) and keys: for a caller that reads no state, or decodes with `decode`.
        """
        source = conn or self.pool
        read, rest = (q.READ_ALL_HEADS, q.REST_OF_TRANSACTION_HEADS) if heads else (
            q.READ_ALL, q.REST_OF_TRANSACTION)  # fmt: skip
        rows = list(await source.fetch(read, after[0], after[1], limit))
        if len(rows) == limit:
            last = rows[-1]
            rows += await source.fetch(rest, last[8], last[4])
        recorded = [_recorded(r) for r in rows]
        if not heads:
            await self.load_keys(source, recorded)
        return recorded

    async def decode(
        self, conn: Any, recorded: Sequence[RecordedEvent]
    ) -> list[DomainEventProtocol[UUID]]:
        """The domain events of a batch `read_all(heads=True)` read: those this process
        committed lately as it wrote them (RecentEvents), while their subjects' keys are
        still held; the others read (their states) and decoded. A batch with an erasure is
        read and decoded whole."""
        recent = [self._recent(r) for r in recorded]
        if any(r.topic == _SUBJECT_ERASED for r in recorded):
            recent = [None] * len(recorded)
        missing = [r for r, e in zip(recorded, recent, strict=True) if e is None]
        if missing:
            unread = [r.notification_id for r in missing if not r.state]
            if unread:
                states = dict(await conn.fetch(q.STATES, unread))
                missing = [
                    r if r.state else dataclasses.replace(r, state=states[r.notification_id])
                    for r in missing
                ]
            await self.load_keys(conn, missing)
        decoded = iter(missing)
        return [
            e if e is not None else self.to_domain(next(decoded))
            for e in recent
        ]

    def _recent(self, recorded: RecordedEvent) -> DomainEventProtocol[UUID] | None:
        """The event as written, if kept and if reading it from the store would show the same:
        its subject's key (and those of the members whose displays it holds) still held."""
        event = self.recent.get(recorded)
        if event is None or not is_personal_topic(recorded.topic):
            return event
        subjects = [event.originator_id, *uuids(getattr(event, "displays", None) or ())]
        return event if all(self.keys.cipher(s) is not None for s in subjects) else None

    async def load_keys(
        self, conn: Any, recorded: Sequence[RecordedEvent], *, refresh: bool = False
    ) -> None:
        """Load the data keys `to_domain` needs for these events (call before decoding them).

        A `SubjectErased` event among them drops its subject's cached key first: a follower
        on another instance stops decrypting the subject's events from there on.
        """
        subjects: set[UUID] = set()
        for r in recorded:
            if is_personal_topic(r.topic):
                subjects.add(r.originator_id)
                if b'"_displays_":{"' in r.state:  # members' displays, under their keys
                    subjects.update(display_members(orjson.loads(r.state)))
            elif r.topic == _SUBJECT_ERASED:
                erased = orjson.loads(r.state).get("subject_id")
                if isinstance(erased, dict):
                    self.keys.forget([UUID(erased["_data_"])])
        if subjects:
            await self.keys.load(conn, subjects, refresh=refresh, missing_unreadable=True)

    def to_domain(self, recorded: RecordedEvent) -> DomainEventProtocol[UUID]:
        return self.mapper.to_domain_event(recorded.stored())

    async def load(self, conn: Conn | asyncpg.Pool, originator_id: UUID) -> Aggregate | None:
        """Rebuild an aggregate by replaying its stream; None if the stream is empty."""
        aggregate: Any = None
        for recorded in await self.read_stream(conn, originator_id, fresh_keys=False):
            aggregate = self.to_domain(recorded).mutate(aggregate)  # type: ignore[attr-defined]
        return aggregate  # type: ignore[no-any-return]

    async def head(self, conn: Conn | asyncpg.Pool | None = None) -> int:
        """Highest notification_id committed so far (0 for an empty store)."""
        value = await (conn or self.pool).fetchval(
            "SELECT coalesce(max(notification_id), 0) FROM stored_events"
        )
        return int(value)

    async def follow(
        self,
        after: Position = START,
        *,
        batch_size: int = 1000,
        poll_interval: float = 1.0,
        dsn_connect: Any = None,
    ) -> AsyncIterator[list[RecordedEvent]]:
        """Yield batches forever: LISTEN for appends, poll as a fallback."""
        woken = asyncio.Event()
        listener = await (dsn_connect() if dsn_connect else self.pool.acquire())

        def on_notify(*_: object) -> None:
            woken.set()

        await listener.add_listener(NOTIFY_CHANNEL, on_notify)
        try:
            position = after
            while True:
                woken.clear()
                batch = await self.read_all(position, batch_size)
                if batch:
                    position = batch[-1].position
                    yield batch
                    if len(batch) == batch_size:
                        continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), poll_interval)
        finally:
            with contextlib.suppress(Exception):
                await listener.remove_listener(NOTIFY_CHANNEL, on_notify)
            if dsn_connect:
                await listener.close()
            else:
                await self.pool.release(listener)


def _all_first(stored: Sequence[StoredEvent]) -> bool:
    """Only first events (new streams): the append needs no order or erasure check."""
    return all(s.originator_version == 1 for s in stored)


@functools.lru_cache(maxsize=16)
def _append_with(statement: str, *, first: bool) -> str:
    if first:
        return q.APPEND_WITH.format(ctes=q.FIRST_CTES, insert=q.FIRST_INSERT, statement=statement)
    return q.APPEND_WITH.format(ctes=q.APPEND_CTES, insert=q.APPEND_INSERT, statement=statement)
