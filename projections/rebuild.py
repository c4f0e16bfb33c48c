"""Rebuild a projection from the event store while the service keeps serving.

1. Shadow tables (`<table>__rebuild`) with the live tables' columns and primary keys.
2. Replay every event from position 0 through the projection's own handler, in batches,
   following the log in commit-safe order; then keep catching up until the log is quiet.
3. Secondary indexes are built on the shadow once, after the bulk load.
4. Compare the shadow with the live view in one snapshot, without locking the live view
   (the report's rows added, removed, changed).
5. Swap: lock the live tables, apply the last events, rename shadow over live, in one
   transaction. Readers see the old view or the new one, never a half-built one. A writer
   blocked on the lock finds the new table when it resumes (PostgreSQL resolves a table name
   again after waiting for its lock) and writes its own change there.

A dry run (or `verify`) stops before the swap; the shadow is always dropped unless swapped.
A failed or interrupted rebuild leaves the live tables untouched, and the next run starts from a
fresh shadow. The shadow tables are in projections/shadow.py, the comparison in
projections/diff.py; this module replays, catches up and swaps.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from eventsourcing.utils import TopicError, resolve_topic

from infra import collector
from infra import eventstore_sql as q
from infra.database import Database
from infra.eventstore import START, Conn, Position, RecordedEvent
from infra.sealing import SealingMapper
from projections import state
from projections.diff import TableDiff, diff
from projections.registry import Projection, Replay
from projections.shadow import create_shadow, drop_shadow, index_shadow, shadow_of, swap_in
from projections.shared import SharedLog

_COLUMNS = (
    "originator_id, originator_version, topic, state, notification_id, tenant_id, recorded_at,"
    " request_id, transaction_id"
)
_ERASURE = "domain.erasure:Erasure.SubjectErased"  # (infra.eventstore.load_keys)
BATCH_SIZE = 5000
# A replay's batch (thousands of decoded events, the copies and rows made of them) lives for the
# whole batch, so the cyclic collector promotes it to the oldest generation, and each time a
# quarter of that generation was so promoted it walks the whole heap: a third of the audit
# log's CPU in bench.rebuild, for ~2,000 objects found in 100,000 events. A rebuild pauses it
# (as the feed producer's catch-up does) and collects every COLLECT_EVERY events instead.
COLLECT_EVERY = 500_000
Progress = Callable[[int, int], None]  # (events applied so far, events in the log)


@dataclass
class RebuildReport:
    name: str
    events: int
    seconds: float
    swapped: bool
    diffs: list[TableDiff]
    position: Position
    cpu_seconds: float = 0.0  # this process's CPU while rebuilding
    peak_rss: int = 0  # bytes: this process's peak resident memory so far

    @property
    def drift(self) -> bool:
        return any(d.drift for d in self.diffs)


class _ReadAhead(list[RecordedEvent]):
    """A batch read (and decoded) on a pooled connection while the one before was applied."""

    def __init__(
        self,
        rows: list[RecordedEvent],
        after: Position,
        mine: Sequence[RecordedEvent],
        events: list[Any],
    ) -> None:
        super().__init__(rows)
        self.after = after
        self.mine = mine
        self.events = events


@functools.lru_cache(maxsize=1024)
def _folds(handles: tuple[type, ...], topic: str) -> bool:
    """Does a projection folding events of the classes `handles` want this topic's events?"""
    try:
        return issubclass(resolve_topic(topic), handles)
    except TopicError:
        return True  # decode it: the mapper reports an unknown topic as it always has


async def read_batch(source: Any, after: Position, limit: int) -> list[RecordedEvent]:
    """EventStore.read_all's batch, without its keys (`_decode` loads those it needs)."""
    rows = list(await source.fetch(q.READ_ALL, after[0], after[1], limit))
    if len(rows) == limit:
        last = rows[-1]
        rows += await source.fetch(q.REST_OF_TRANSACTION, last[8], last[4])
    return [RecordedEvent(*r) for r in rows]


class Rebuilder:
    def __init__(
        self,
        db: Database,
        projection: Projection,
        *,
        batch_size: int = BATCH_SIZE,
        progress: Progress | None = None,
        lock_timeout: str = "2s",
        shared: SharedLog | None = None,
    ) -> None:
        self.db = db
        self.shared = shared  # a bulk replay's read shared with other rebuilds (shared.py)
        self.projection = projection
        self.batch_size = batch_size
        self.progress = progress
        self.lock_timeout = lock_timeout
        self.position: Position = START
        self.applied = 0
        self.tables = {t: shadow_of(t) for t in projection.tables}
        self._ahead: asyncio.Task[_ReadAhead] | None = None
        self._replay: Replay | None = None  # the bulk replay's folding, if the projection has one

    @property
    def is_async(self) -> bool:
        return self.projection.mode == "async"

    async def _live_checkpoint(self, conn: Conn, *, lock: bool = False) -> Position | None:
        """Where an asynchronous projection's live view stands (None: inline, always current)."""
        if not self.is_async:
            return None
        return await state.checkpoint(conn, self.projection.name, lock=lock)

    async def _hold_checkpoint(self, conn: Conn) -> Position | None:
        """Async: lock the checkpoint row (the runner waits) and return the live view's position.

        Taken before any live table, in the runner's own order (checkpoint row, then tables):
        the other order deadlocks with a runner step that holds the row and waits for a table.
        """
        return await self._live_checkpoint(conn, lock=True)

    async def _final_catch_up(
        self, conn: Conn, total: int, checkpoint: Position | None
    ) -> Position:
        """Inside the caller's transaction, bring the shadow to where the live view stands.

        Inline: the caller holds the live tables' locks, so every committed event is in the
        live view and no writer can commit one that is not. Async: the caller holds the
        checkpoint row (`_hold_checkpoint`), and the live view stands exactly at it.
        """
        if checkpoint is not None:
            await self._catch_up(conn, total, committed_only=True, until=checkpoint)
            return checkpoint
        await self._catch_up(conn, total, committed_only=True)
        return self.position

    async def _decode(
        self, conn: Any, batch: Sequence[RecordedEvent]
    ) -> tuple[Sequence[RecordedEvent], list[Any]]:
        # Decoding is most of a replay's cost: a projection that names the event classes it
        # folds (`HANDLES`) gets only those, the ones its own filter would keep anyway; and
        # only their subjects' data keys are loaded (none for a projection that never decodes),
        # with the erasures among the rest, which drop an erased subject's cached key.
        if not self.projection.decodes:
            return batch, []
        handles = self.projection.handles
        mine = batch if handles is None else [r for r in batch if _folds(handles, r.topic)]
        keyed = mine if handles is None else [*mine, *(r for r in batch if r.topic == _ERASURE)]
        await self.db.store.load_keys(conn, keyed)
        mapper = self.db.store.mapper
        if isinstance(mapper, SealingMapper):  # without a StoredEvent made for each
            decoded = mapper.decoded
            return mine, [
                decoded(r.topic, r.state, r.originator_id, r.originator_version) for r in mine
            ]
        return mine, [self.db.store.to_domain(r) for r in mine]

    async def _rows(self, source: Any, after: Position) -> list[RecordedEvent]:
        return await read_batch(source, after, self.batch_size)

    async def _apply(self, conn: Conn, batch: Sequence[RecordedEvent]) -> None:
        if isinstance(batch, _ReadAhead):
            mine, events = batch.mine, batch.events
        else:
            mine, events = await self._decode(conn, batch)
        if self._replay is not None:
            await self._replay.apply(conn, events, self.tables, mine)
        else:
            await self.projection.apply(conn, events, self.tables, mine)
        self.position = batch[-1].position
        if (self.applied + len(batch)) // COLLECT_EVERY > self.applied // COLLECT_EVERY:
            gc.collect()
        self.applied += len(batch)

    async def _read(self, conn: Conn, until: Position | None) -> list[RecordedEvent]:
        """The next batch after the position. While it is applied, the one after it is read
        and decoded on a pooled connection, so PostgreSQL and Python work at the same time.

        Reading earlier changes nothing: a read returns committed events only, in commit-safe
        order, whenever it runs; one for another position (a retried swap) is not used.
        """
        ahead, self._ahead = self._ahead, None
        batch: list[RecordedEvent] = []
        if ahead is not None:
            early = await ahead
            if early.after == self.position:
                batch = early
        if not batch:
            batch = await self._rows(conn, self.position)
        if len(batch) >= self.batch_size and (until is None or batch[-1].position < until):
            self._ahead = asyncio.ensure_future(self._read_ahead(batch[-1].position))
        return batch

    async def _read_ahead(self, after: Position) -> _ReadAhead:
        async with self.db.pool.acquire() as conn:
            rows = await self._rows(conn, after)
            return _ReadAhead(rows, after, *await self._decode(conn, rows))

    async def _stop_reading_ahead(self) -> None:
        # Let it finish rather than cancel it: a query cancelled half-way can hand its pooled
        # connection back in a state the next user trips on (seen as "SET TRANSACTION
        # ISOLATION LEVEL must be called before any query"). It is one batch's read.
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            await asyncio.gather(ahead, return_exceptions=True)

    async def _catch_up(
        self,
        conn: Conn,
        total: int,
        *,
        committed_only: bool = False,
        until: Position | None = None,
    ) -> int:
        """Apply events after the position; `committed_only` reads every committed event,
        for use when the caller's locks guarantee no writer can still commit below it.
        `until` stops at a position (an asynchronous projection's live checkpoint)."""
        done = 0
        while until is None or self.position < until:
            if committed_only:
                rows = list(
                    await conn.fetch(
                        f"SELECT {_COLUMNS} FROM stored_events"
                        " WHERE (transaction_id, notification_id) > ($1::bigint, $2::bigint)"
                        " ORDER BY transaction_id, notification_id LIMIT $3",
                        self.position[0],
                        self.position[1],
                        self.batch_size,
                    )
                )
                if len(rows) == self.batch_size:
                    # Like read_all, end on a transaction boundary: handlers see whole requests.
                    rows += await conn.fetch(
                        f"SELECT {_COLUMNS} FROM stored_events WHERE transaction_id = $1"
                        " AND notification_id > $2 ORDER BY notification_id",
                        rows[-1]["transaction_id"],
                        rows[-1]["notification_id"],
                    )
                batch = [RecordedEvent(*r) for r in rows]
            else:
                batch = await self._read(conn, until)
            if until is not None and batch and batch[-1].position > until:
                batch = [r for r in batch if r.position <= until]
            if not batch:
                return done
            await self._apply(conn, batch)
            done += len(batch)
            if self.progress:
                self.progress(self.applied, max(total, self.applied))
        return done

    async def _fold(
        self, conn: Conn, total: int, until: Position | None, batch: list[RecordedEvent]
    ) -> bool:
        """A batch of a shared read (up to `until`); False once past it."""
        past = until is not None and batch[-1].position > until
        if past:
            batch = [r for r in batch if r.position <= until]  # type: ignore[operator]
        if batch:
            await self._apply(conn, batch)
            if self.progress:
                self.progress(self.applied, max(total, self.applied))
        return not past

    async def run(self, *, dry_run: bool = False) -> RebuildReport:
        with collector.paused():
            return await self._run(dry_run)

    async def _run(self, dry_run: bool) -> RebuildReport:
        started = time.perf_counter()
        cpu = _cpu()
        conn = await self.db.connect()
        try:
            total = int(await conn.fetchval("SELECT count(*) FROM stored_events"))
            for table in self.projection.tables:
                await create_shadow(conn, table)
            # Bulk replay, then catch up with what was appended meanwhile until quiet. An
            # asynchronous projection's live view stands at its checkpoint: replay up to it.
            until = await self._live_checkpoint(conn)
            self._replay = self.projection.replay()
            if self.shared is not None:
                shared, self.shared = self.shared, None
                await shared.replay(functools.partial(self._fold, conn, total, until))
            await self._catch_up(conn, total, until=until)
            while await self._catch_up(conn, total, until=until):
                pass
            # What the replay held in memory goes to the shadow before anything reads it in a
            # transaction that may roll back (the comparison, the swap).
            if self._replay is not None:
                replay, self._replay = self._replay, None
                await replay.flush(conn, self.tables)
            for table in self.projection.tables:
                await index_shadow(conn, table)
            # The differences are taken in a snapshot, with no lock on the live view (at a
            # million rows they take seconds); the swap then holds its locks only to apply
            # the last events and rename.
            diffs = await self._compare(conn, total)
            swapped = False
            if not dry_run:
                await self._swap(conn, total)
                swapped = True
            return RebuildReport(
                self.projection.name,
                self.applied,
                time.perf_counter() - started,
                swapped,
                diffs,
                self.position,
                _cpu() - cpu,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            )
        finally:
            if self.shared is not None:
                self.shared.skip()  # failed before its replay
            try:
                await self._stop_reading_ahead()
                for table in self.projection.tables:
                    await drop_shadow(conn, table)
            finally:
                await conn.close()

    async def _compare(self, conn: Conn, total: int) -> list[TableDiff]:
        """Shadow against live in one snapshot: both then reflect the same committed events.

        Async: the live view only moves under the checkpoint row's lock, which we hold, so
        read committed is stable; a snapshot taken before waiting for that lock would be
        stale (a serialization failure whenever the runner was mid-step).

        What it applies to the shadow is rolled back, and the position with it: it read every
        event committed in its snapshot, beyond writers still in progress with lower
        transaction ids, and a swap that went on from there would never apply theirs.
        """
        saved = self.position, self.applied
        tx = conn.transaction(isolation="read_committed" if self.is_async else "repeatable_read")
        await tx.start()
        try:
            checkpoint = await self._hold_checkpoint(conn)
            await self._final_catch_up(conn, total, checkpoint)
            return [await diff(conn, self.projection, t) for t in self.projection.tables]
        finally:
            await tx.rollback()
            self.position, self.applied = saved

    async def _swap(self, conn: Conn, total: int) -> None:
        for attempt in range(20):
            # What the transaction applies to the shadow is undone with it if it fails.
            saved = self.position, self.applied
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = '{self.lock_timeout}'")
                    checkpoint = await self._hold_checkpoint(conn)
                    # Wait for the first table only, holding no other live table: a reader
                    # joining them in the other order would otherwise deadlock with us (and
                    # get an error). The rest now or never (NOWAIT), then retry.
                    first, *rest = self.projection.tables
                    await conn.execute(f"LOCK TABLE {first} IN ACCESS EXCLUSIVE MODE")
                    if rest:
                        await conn.execute(
                            f"LOCK TABLE {', '.join(rest)} IN ACCESS EXCLUSIVE MODE NOWAIT"
                        )
                    # No writer can change the live view now; every event committed so far
                    # is visible, and any other writer will write its own change after us.
                    position = await self._final_catch_up(conn, total, checkpoint)
                    for table in self.projection.tables:
                        await swap_in(conn, table)
                    await state.record_state(conn, self.projection, position, rebuilt=True)
                return
            except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
                if attempt == 19:
                    raise
                # Busy writers: let them through, catch up some more (never past an async
                # view's checkpoint: the runner applies those events itself), try again.
                self.position, self.applied = saved
                await asyncio.sleep(0.01 * (attempt + 1))
                until = await self._live_checkpoint(conn)
                await self._catch_up(conn, total, until=until)
        raise AssertionError("unreachable")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
