"""The feed producer: turns the event store into each stream's SETs, in commit-safe order.

A follower like the asynchronous projections' runners (projections/runner.py): one instance
holds the `feeds` advisory lock and produces (the others stand by), each stream has its own
checkpoint, and one step turns a batch of whole transactions into signed SETs in `feed_sets`
and moves that stream's checkpoint in the same transaction, with the stream's row locked. So a
SET survives restarts, a redelivery resends the same token, and a SET produced again after a
lost commit carries the same `jti` (derived from the event it reports, build.Signer). A stream
with `MAX_PENDING` SETs not yet delivered waits (its checkpoint stays), so a consumer that
stops polling costs a bounded table, not an unbounded one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from infra import eventstore_sql as q
from infra.database import Database
from infra.eventstore import NOTIFY_CHANNEL, Conn, Position, RecordedEvent
from infra.keys import PERSONAL_MODULES, is_erased
from projections.runner import LOCK_NAMESPACE, SESSION_LOST, idle, lead
from service.feeds import sets
from service.feeds.build import (
    Signer,
    StreamView,
    Token,
    Unsigned,
    by_request,
    emit,
    holds_values,
    method_of,
    needs_resource,
    shape_of,
    txn_of,
)
from service.feeds.keys import KeyRing
from service.feeds.signing import CHUNK, POOL_FROM, SIGNERS
from service.feeds.streams import Stream

log = structlog.get_logger("scimledger.feeds")
_PERSONAL = tuple(m + ":" for m in PERSONAL_MODULES)
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


def issuer_of(base: str) -> str:
    """RFC 9967 examples: `iss` is the provider; ours is the tenant's SCIM base URL."""
    return base.rstrip("/")


def audience_of(base: str, stream_id: uuid.UUID) -> str:
    """`aud`: the stream (RFC 9967 §2.3.1 Figure 2 names a feed by URL)."""
    origin = base.rstrip("/").removesuffix("/scim/v2")
    return f"{origin}/events/{stream_id}"


class Producer:
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
        self.woken = asyncio.Event()
        self.freed = False  # woken by acknowledgements (FEED_CHANNEL), not by new commits
        # Set (and replaced) when a step has stored SETs: a waiting long poll of this
        # instance answers at once (poll.py), instead of at its next check.
        self.stored = asyncio.Event()
        self._ahead: dict[uuid.UUID, tuple[Position, asyncio.Future[list[RecordedEvent]]]] = {}
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
            batch = await self._batch(conn, stream_id, position)
            if not batch:
                return 0
            if len(batch) >= self.batch_size:  # a catch-up: read the next batch meanwhile
                self._read_ahead(stream_id, batch[-1].position)
            stream = Stream.of(row)
            mine = [r for r in batch if r.tenant_id == stream.tenant_id]
            tokens: list[Token] = []
            if mine:
                with _young_objects_kept(len(batch) >= self.batch_size):
                    tokens = await self._sets(conn, stream, mine, row["kid"], row["epoch"])
            made = await _store(conn, stream_id, tokens, batch[-1].position)
        self.produced += made
        if made:
            self.stored.set()
            self.stored = asyncio.Event()
        return len(batch)

    async def _batch(
        self, conn: Conn, stream_id: uuid.UUID, position: Position
    ) -> list[RecordedEvent]:
        """The events after `position`: read ahead by the previous step if it guessed this
        position (the committed log after a position never changes), else read now."""
        ahead = self._ahead.pop(stream_id, None)
        if ahead is not None:
            at, task = ahead
            if at == position:
                with contextlib.suppress(Exception):  # a failed read-ahead: read again
                    return await task
            else:
                _drop(task)
        return await read_log(conn, position, self.batch_size)

    def _read_ahead(self, stream_id: uuid.UUID, position: Position) -> None:
        """Read the batch after `position` on another connection of the pool while this step
        builds and signs its SETs: the database's work overlaps the producer's."""
        old = self._ahead.pop(stream_id, None)
        if old is not None:
            _drop(old[1])
        if len(self._ahead) >= MAX_READ_AHEAD:  # each holds a connection of the pool
            return
        task = asyncio.ensure_future(read_log(self.db.pool, position, self.batch_size))
        self._ahead[stream_id] = (position, task)

    def forget_reads(self) -> None:
        for _, task in self._ahead.values():
            _drop(task)
        self._ahead.clear()

    async def _sets(
        self,
        conn: Conn,
        stream: Stream,
        records: Sequence[RecordedEvent],
        kid: str | None,
        epoch: int = 0,
    ) -> list[Token]:
        """(jti, kid, compact JWS, subject) of each SET these events make for the stream, in
        order."""
        key = await self.keys.current(conn, stream.tenant_id, kid)
        base = self.base_url()
        issuer, audience = issuer_of(base), audience_of(base, stream.id)
        view = StreamView(stream.id, stream.full, stream.events, stream.scope_group)
        sign = Signer(key, issuer, audience, stream.id, epoch)
        # The events whose values it reads (a notice stream: those with an externalId, the
        # others' SETs carry none): their subjects' erasures, then their data keys, one round
        # trip each (EventStore.load_keys).
        valued = records if view.full else [r for r in records if holds_values(r)]
        unsealed = None if view.full else {id(r) for r in valued}  # None: all of them
        await self._erased(conn, valued)
        await self.db.store.load_keys(conn, valued)
        members: set[str] | None = None
        if stream.scope_group is not None:
            members = {
                str(r[0])
                for r in await conn.fetch(
                    "SELECT member_id FROM feed_members WHERE stream_id = $1", stream.id
                )
            }
        joined: list[str] = []
        left: list[str] = []
        # A catch-up's SETs are signed by the signer processes, a chunk at a time while the
        # next ones are built; a live write's few here.
        pooled = len(records) >= POOL_FROM and SIGNERS.workers > 0
        signed: list[asyncio.Future[list[Token]]] = []
        out: list[Unsigned] = []
        for transaction in by_request(records):
            decoded = await self._decoded(conn, transaction, unsealed)
            method = method_of(decoded)
            changes = sets.changes_of(decoded)
            for change in changes:
                if needs_resource(change, method, view):
                    change.data = await _resource_at(self.db, conn, change)
            out += emit(changes, method, txn_of(transaction), view, members, sign, joined, left)
            if pooled and len(out) >= CHUNK:
                signed.append(asyncio.ensure_future(sign.pooled(out)))
                out = []
        if joined or left:
            await conn.execute(
                "DELETE FROM feed_members WHERE stream_id = $1 AND member_id = any($2::uuid[])",
                stream.id,
                left,
            )
            await conn.execute(
                "INSERT INTO feed_members (stream_id, member_id)"
                " SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING",
                stream.id,
                [m for m in joined if m not in left],
            )
        if not signed:
            return sign.inline(out)
        if out:
            signed.append(asyncio.ensure_future(sign.pooled(out)))
        return [token for chunk in await asyncio.gather(*signed) for token in chunk]

    async def _decoded(
        self, conn: Conn, transaction: Sequence[RecordedEvent], unsealed: set[int] | None
    ) -> list[Any]:
        """A transaction's domain events: unsealed for a full-form stream (`unsealed` None), for
        a notice one those in `unsealed` (build.holds_values; build.shape_of for the others)."""
        store = self.db.store
        sealed = transaction if unsealed is None else [r for r in transaction if id(r) in unsealed]
        if not sealed:
            return [shape_of(r) for r in transaction]
        # Their keys again (a no-op when cached): the awaits of the transactions before may
        # have let other readers evict them from the key cache (infra.keys).
        await store.load_keys(conn, sealed)
        if unsealed is None:
            return [store.to_domain(r) for r in transaction]
        return [store.to_domain(r) if id(r) in unsealed else shape_of(r) for r in transaction]

    async def _erased(self, conn: Conn, records: Sequence[RecordedEvent]) -> None:
        """Mark the subjects of these events erased whose erasure has committed (on any
        instance: this one may still hold the key cached), before their SETs are built: an
        erased subject's SETs are notices (build.emit). The erasure waits for this step's
        stream lock, then rewrites what the step stored (service/feeds/erasure.py)."""
        subjects = list({r.originator_id for r in records if r.topic.startswith(_PERSONAL)})
        if not subjects:
            return
        for row in await conn.fetch(
            "SELECT subject_id FROM subject_keys WHERE subject_id = any($1::uuid[])"
            " AND wrapped IS NULL",
            subjects,
        ):
            if not is_erased(row[0]):
                self.db.store.keys.erased(row[0])

    async def _record_error(self, conn: Conn, stream_id: uuid.UUID, error: Exception) -> None:
        text = f"{type(error).__name__}: {error}"[:2000]
        log.error("feed producer failed", stream=str(stream_id), error=text)
        with contextlib.suppress(Exception):
            await conn.execute(
                "UPDATE feed_streams SET last_error = $2 WHERE id = $1", stream_id, text
            )


@contextlib.contextmanager
def _young_objects_kept(catching_up: bool) -> Iterator[None]:
    """A catch-up batch's objects (events, changes, claims: tens per SET) live for its whole
    step, so the collector would promote them to the oldest generation, and every quarter of
    that generation's size so promoted runs a full collection: over a large heap (a key cache
    of a million subjects) that cost ~50 µs per SET (bench.feeds). The cyclic collector waits
    while a catch-up batch is built; refcounting frees the batch after, and what is left is
    collected as usual."""
    if not catching_up or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


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


async def _resource_at(db: Database, conn: Conn, change: sets.Change) -> dict[str, Any] | None:
    """The resource as it was right after the change (for `put:full` data; a group with its
    members), by replay of its stream up to the change's version."""
    events = [
        db.store.to_domain(record)
        for record in await db.store.read_stream(conn, change.resource_id)
        if record.originator_version <= change.version
    ]
    return sets.replayed(change.resource_id, events)


PRODUCER = web.AppKey("feed_producer", Producer)
