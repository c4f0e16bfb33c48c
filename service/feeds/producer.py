"""The feed producer: turns the event store into each stream's SETs, in commit-safe order.

A follower like the asynchronous projections' runners (projections/runner.py): one instance
holds the `feeds` advisory lock and produces (the others stand by), each stream has its own
checkpoint, and one step turns a batch of whole transactions into signed SETs in `feed_sets`
and moves that stream's checkpoint in the same transaction, with the stream's row locked. So a
SET survives restarts, a redelivery resends the same token, and a SET produced again after a
lost commit carries the same `jti` (derived from the event it reports, build.Signer). A stream
with `MAX_PENDING` SETs not yet delivered waits (its checkpoint stays), so a consumer that
stops polling costs a bounded table, not an unbounded one. In a catch-up the next batch is
read and its SETs built while a step's are signed and stored (service/feeds/batch.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from infra import eventstore_sql as q
from infra.database import Database
from infra.eventstore import NOTIFY_CHANNEL, Conn, Position, RecordedEvent
from projections.runner import LOCK_NAMESPACE, SESSION_LOST, idle, lead
from service.feeds.batch import Ahead, Builder, audience_of, issuer_of, young_objects_kept
from service.feeds.build import Token
from service.feeds.keys import KeyRing
from service.feeds.streams import Stream

log = structlog.get_logger("scimledger.feeds")
__all__ = ["audience_of", "issuer_of"]  # where the SETs' claims are made (batch.py)
MAX_PENDING = 10_000
# Acknowledgements that free room in a stream's outbox wake the producer (poll.py), so a
# stream held at MAX_PENDING resumes at once, not at the next `poll_interval`.
FEED_CHANNEL = "scimledger_feeds"
MAX_READ_AHEAD = 2  # streams catching up with a batch read ahead at once
LOCK_NAME = "feeds"
# A lock namespace of its own: the projections' one holds a lock per projection, no other.
FEEDS_LOCK_NAMESPACE = LOCK_NAMESPACE + 1
# The feed's own commits do not wait for the WAL flush, so they do not queue behind (or
# ahead of) the SCIM writers' ones. A crash or failover may lose the last of them, atomically:
# a step's SETs with its checkpoint (produced again with the same `jti`s, build.Signer, so a
# receiver that had them sees duplicates it can drop, and its acknowledgement of either copy
# works), a delivery's removal (sent again, the same `jti`).
# At-least-once and the order hold; nothing is skipped.
ASYNC_COMMIT = "SET LOCAL synchronous_commit = off"
# What is pending is counted (up to MAX_PENDING) only when the span of its seqs reaches
# MAX_PENDING: the span, two probes of the index, bounds the count from above. Counting at
# every step walked the pending rows (and the index entries of acknowledged ones not yet
# vacuumed): a third of PostgreSQL's work per SET in a catch-up (bench.feeds).
_STEP = """
SELECT s.*, t.name AS tenant,
  CASE WHEN w.span < $2 THEN w.span ELSE
    (SELECT count(*) FROM (SELECT 1 FROM feed_sets f WHERE f.stream_id = s.id LIMIT $2) p)
  END AS pending,
  (SELECT k.kid FROM feed_keys k WHERE k.tenant_id = s.tenant_id AND k.retired_at IS NULL) AS kid
FROM feed_streams s JOIN tenants t ON t.id = s.tenant_id,
LATERAL (SELECT coalesce(
  (SELECT f.seq FROM feed_sets f WHERE f.stream_id = s.id ORDER BY f.seq DESC LIMIT 1)
  - (SELECT f.seq FROM feed_sets f WHERE f.stream_id = s.id ORDER BY f.seq LIMIT 1) + 1, 0
) AS span) w
WHERE s.id = $1 AND s.paused_at IS NULL
FOR UPDATE OF s
"""


class Producer(Builder):
    def __init__(
        self,
        db: Database,
        base_url: Callable[[], str],
        *,
        batch_size: int = 1000,
        poll_interval: float = 1.0,
        standby_interval: float = 1.0,
        coalesce: float = 0.1,
    ) -> None:
        self.db = db
        self.base_url = base_url
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.standby_interval = standby_interval
        self.keys = KeyRing()
        self.active = False
        self.produced = 0
        self.held = 0  # steps that found their stream's outbox full
        self.built_ahead = 0  # steps that stored a batch built ahead (batch.Ahead)
        self.woken = asyncio.Event()
        self.freed = False  # woken by acknowledgements (FEED_CHANNEL), not by new commits
        # Set (and replaced) when a step has stored SETs: a waiting long poll of this
        # instance answers at once (poll.py), instead of at its next check.
        self.stored = asyncio.Event()
        self._built: dict[uuid.UUID, asyncio.Future[Ahead]] = {}  # next batches, built ahead
        # After a wake-up, wait this long for more commits: one step per stream then covers
        # many SCIM requests, instead of a handful of round trips per stream per request.
        self.coalesce = coalesce

    async def run(self, stop: asyncio.Event, on_lead: Callable[[], None] | None = None) -> None:
        def active(on: bool) -> None:
            self.active = on
            if on:
                log.info("feed producer active")
                if on_lead is not None:
                    on_lead()

        def interrupted(e: BaseException) -> None:
            log.warning("feed producer interrupted", error=f"{type(e).__name__}: {e}")

        await lead(
            self.db,
            (FEEDS_LOCK_NAMESPACE, LOCK_NAME),
            stop,
            self.standby_interval,
            lambda conn: self._follow(conn, stop),
            active,
            interrupted,
        )

    async def _follow(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        def wake(*_: object) -> None:
            self.woken.set()

        def freed(*_: object) -> None:
            self.woken.set()
            self.freed = True

        await conn.add_listener(NOTIFY_CHANNEL, wake)
        await conn.add_listener(FEED_CHANNEL, freed)
        try:
            await self._steps(conn, stop)
        finally:
            self.forget_reads()

    async def _steps(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.woken.clear()
            self.freed = False
            held = self.held
            busy = False
            ids = [
                r[0]
                for r in await conn.fetch(
                    "SELECT id FROM feed_streams WHERE paused_at IS NULL ORDER BY created_at"
                )
            ]
            for stream_id in ids:
                try:
                    done = await self.step(conn, stream_id)
                except SESSION_LOST:
                    raise  # to `lead`: a new session, on the writable primary
                except Exception as e:  # a bug: record it on the stream, keep its checkpoint
                    await self._record_error(conn, stream_id, e)
                    continue
                busy = busy or done >= self.batch_size
            if busy:
                continue
            await idle(conn, self.woken, stop, self.poll_interval)
            # Room made by acknowledgements for a stream held full is filled at once (its
            # consumer waits); other wake-ups wait for more commits.
            if self.woken.is_set() and not (self.freed and self.held > held) and self.coalesce:
                await asyncio.sleep(self.coalesce)

    async def step(self, conn: Conn, stream_id: uuid.UUID) -> int:
        """Produce one batch of one stream's SETs; returns how many events it read."""
        async with conn.transaction():
            await conn.execute(ASYNC_COMMIT)
            # One round trip for the stream, what it has pending and its tenant's current key.
            row = await conn.fetchrow(_STEP, stream_id, MAX_PENDING)
            if row is None:
                return 0
            if row["pending"] >= MAX_PENDING:
                self.held += 1
                return 0
            position = Position(row["checkpoint_transaction"], row["checkpoint_position"])
            stream = Stream.of(row)
            depends = (stream, row["kid"], row["epoch"], self.base_url())
            ahead = await self._built_ahead(conn, stream_id, position, depends)
            batch = ahead.records if ahead is not None else await self._batch(conn, position)
            if not batch:
                return 0
            catching_up = len(batch) >= self.batch_size
            mine = [r for r in batch if r.tenant_id == stream.tenant_id]
            built = ahead.built if ahead is not None else None
            self.built_ahead += ahead is not None
            with young_objects_kept(catching_up):
                if built is None and mine:
                    built = await self._build(conn, stream, mine, row["kid"], row["epoch"])
                if catching_up:  # the next batch read and built while these are signed, stored
                    self._read_ahead(stream, batch[-1].position, depends)
                tokens = await built.signed() if built is not None else []
            made = await _store(conn, stream_id, tokens, batch[-1].position)
        self.produced += made
        if made:
            self.stored.set()
            self.stored = asyncio.Event()
        return len(batch)

    async def _built_ahead(
        self, conn: Conn, stream_id: uuid.UUID, position: Position, depends: tuple[Any, ...]
    ) -> Ahead | None:
        """The batch after `position` as the previous step's build ahead made it, if it fits
        (batch.Ahead.fits: nothing it depended on changed); else None, to be built now."""
        task = self._built.pop(stream_id, None)
        if task is None:
            return None
        ahead: Ahead | None = None
        with contextlib.suppress(Exception):  # a failed build ahead: built again, now
            ahead = await task
        if ahead is not None and ahead.after == position and await ahead.fits(conn, self, depends):
            return ahead
        if ahead is not None and ahead.built is not None:
            ahead.built.drop()
        return None

    async def _batch(self, conn: Conn, position: Position) -> list[RecordedEvent]:
        return await read_log(conn, position, self.batch_size)

    def _read_ahead(self, stream: Stream, position: Position, depends: tuple[Any, ...]) -> None:
        """Read the batch after `position` on another connection of the pool and build its
        SETs (batch.py) while this step's are signed and stored: the database's work, the
        signers' and the producer's overlap. The committed log after a position never
        changes; the next step checks that the rest still holds (batch.Ahead.fits)."""
        old = self._built.pop(stream.id, None)
        if old is not None:
            _drop(old)
        if len(self._built) >= MAX_READ_AHEAD:  # each holds a connection of the pool
            return
        self._built[stream.id] = asyncio.ensure_future(self._ahead_of(stream, position, depends))

    async def _ahead_of(
        self, stream: Stream, position: Position, depends: tuple[Any, ...]
    ) -> Ahead:
        records = await read_log(self.db.pool, position, self.batch_size)
        mine = [r for r in records if r.tenant_id == stream.tenant_id]
        _, kid, epoch, _ = depends
        # A scoped stream's members are read and written in the step; a missing key is made
        # there too.
        if not mine or stream.scope_group is not None or kid is None:
            built = None
        else:
            async with self.db.pool.acquire() as conn:
                with young_objects_kept(len(records) >= self.batch_size):
                    built = await self._build(conn, stream, mine, kid, epoch)
        return Ahead(position, depends, records, built)

    def forget_reads(self) -> None:
        for task in self._built.values():
            _drop(task)
        self._built.clear()

    async def _record_error(self, conn: Conn, stream_id: uuid.UUID, error: Exception) -> None:
        text = f"{type(error).__name__}: {error}"[:2000]
        log.error("feed producer failed", stream=str(stream_id), error=text)
        with contextlib.suppress(Exception):
            await conn.execute(
                "UPDATE feed_streams SET last_error = $2 WHERE id = $1", stream_id, text
            )


async def _store(conn: Conn, stream_id: uuid.UUID, tokens: list[Token], last: Position) -> int:
    """The step's SETs into the outbox and the stream's checkpoint after them; how many stored.
    By COPY (a third cheaper for PostgreSQL than an INSERT of the arrays, bench.feeds), in a
    savepoint: a SET still pending from before (its producing commit kept, the checkpoint's
    lost) makes it fail, and the INSERT then keeps that row (the same jti, build.Signer)."""
    made = len(tokens)
    if tokens:
        try:
            async with conn.transaction():
                records = [(stream_id, *t) for t in tokens]
                columns = ("stream_id", "jti", "kid", "token", "subject")
                await conn.copy_records_to_table("feed_sets", records=records, columns=columns)
        except asyncpg.UniqueViolationError:
            made = await conn.fetchval(
                "WITH made AS (INSERT INTO feed_sets (stream_id, jti, kid, token, subject)"
                "  SELECT $1, j, k, t, s FROM unnest($2::text[], $3::text[], $4::text[],"
                "  $5::uuid[]) WITH ORDINALITY AS x (j, k, t, s, n) ORDER BY n"
                "  ON CONFLICT (stream_id, jti) DO NOTHING RETURNING 1) SELECT count(*) FROM made",
                stream_id,
                *(list(column) for column in zip(*tokens, strict=True)),
            )
    await conn.execute(
        "UPDATE feed_streams SET checkpoint_transaction = $2, checkpoint_position = $3,"
        " produced = produced + $4 WHERE id = $1",
        stream_id,
        last[0],
        last[1],
        made,
    )
    return int(made)


async def count_delivered(conn: Conn, stream_id: uuid.UUID, n: int) -> None:
    """Count SETs delivered (acknowledged, accepted) in `feed_delivered`, not on the stream's
    row, which a step holds while it builds and signs (migration 0025)."""
    await conn.execute(
        "INSERT INTO feed_delivered AS d (stream_id, delivered) VALUES ($1, $2)"
        " ON CONFLICT (stream_id) DO UPDATE SET delivered = d.delivered + excluded.delivered",
        stream_id,
        n,
    )


async def read_log(source: Any, after: Position, limit: int) -> list[RecordedEvent]:
    """EventStore.read_all (whole transactions, commit-safe order) without its loading of
    every personal event's data key: the producer loads the keys of what it unseals."""
    rows = list(await source.fetch(q.READ_ALL, after[0], after[1], limit))
    if len(rows) == limit:
        last = rows[-1]
        rows += await source.fetch(q.REST_OF_TRANSACTION, last[8], last[4])
    return [RecordedEvent(*r) for r in rows]


def _drop(task: asyncio.Future[Any]) -> None:
    if task.done():
        if not task.cancelled():
            task.exception()  # retrieved: a failed read-ahead is read again, not logged
    else:
        task.cancel()


PRODUCER = web.AppKey("feed_producer", Producer)
