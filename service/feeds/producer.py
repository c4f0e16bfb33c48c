"""The feed producer: turns the event store into each stream's SETs, in commit-safe order.

A follower like the asynchronous projections' runners (projections/runner.py): one instance
holds the `feeds` advisory lock and produces (the others stand by), each stream has its own
checkpoint, and one step turns a batch of whole transactions into signed SETs in `feed_sets`
and moves that stream's checkpoint in the same transaction, with the stream's row locked. So a
SET is produced exactly once (one `jti`), survives restarts, and a redelivery resends the same
token. A stream with `MAX_PENDING` SETs not yet delivered waits (its checkpoint stays), so a
consumer that stops polling costs a bounded table, not an unbounded one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import structlog

from domain.group import Group
from domain.request import ProvisioningRequest
from domain.user import User
from infra.database import Database
from infra.eventstore import NOTIFY_CHANNEL, Conn, Position, RecordedEvent
from infra.keys import is_erased
from projections.runner import LOCK_NAMESPACE, SESSION_LOST, idle, lead
from service.feeds import sets
from service.feeds.keys import KeyRing
from service.feeds.streams import Stream

log = structlog.get_logger("scimledger.feeds")
MAX_PENDING = 10_000
LOCK_NAME = "feeds"
# A lock namespace of its own: the projections' one holds a lock per projection, no other.
FEEDS_LOCK_NAMESPACE = LOCK_NAMESPACE + 1
_STREAM = "SELECT s.*, t.name AS tenant FROM feed_streams s JOIN tenants t ON t.id = s.tenant_id"


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
    ) -> None:
        self.db = db
        self.base_url = base_url
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.standby_interval = standby_interval
        self.keys = KeyRing()
        self.active = False
        self.produced = 0
        self.woken = asyncio.Event()

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

        await conn.add_listener(NOTIFY_CHANNEL, wake)
        while not stop.is_set():
            self.woken.clear()
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

    async def step(self, conn: Conn, stream_id: uuid.UUID) -> int:
        """Produce one batch of one stream's SETs; returns how many events it read."""
        async with conn.transaction():
            row = await conn.fetchrow(
                _STREAM + " WHERE s.id = $1 AND s.paused_at IS NULL FOR UPDATE OF s", stream_id
            )
            if row is None:
                return 0
            pending = await conn.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM feed_sets WHERE stream_id = $1 LIMIT $2) p",
                stream_id,
                MAX_PENDING,
            )
            if pending >= MAX_PENDING:
                return 0
            position = Position(row["checkpoint_transaction"], row["checkpoint_position"])
            batch = await self.db.store.read_all(position, self.batch_size, conn=conn)
            if not batch:
                return 0
            stream = Stream.of(row)
            mine = [r for r in batch if r.tenant_id == stream.tenant_id]
            tokens = await self._sets(conn, stream, mine) if mine else []
            if tokens:
                await conn.execute(
                    "INSERT INTO feed_sets (stream_id, jti, kid, token)"
                    " SELECT $1, j, k, t FROM unnest($2::text[], $3::text[], $4::text[])"
                    " WITH ORDINALITY AS x (j, k, t, n) ORDER BY n",
                    stream_id,
                    [t[0] for t in tokens],
                    [t[1] for t in tokens],
                    [t[2] for t in tokens],
                )
            last = batch[-1].position
            await conn.execute(
                "UPDATE feed_streams SET checkpoint_transaction = $2, checkpoint_position = $3,"
                " produced = produced + $4 WHERE id = $1",
                stream_id,
                last[0],
                last[1],
                len(tokens),
            )
        self.produced += len(tokens)
        return len(batch)

    async def _sets(
        self, conn: Conn, stream: Stream, records: Sequence[RecordedEvent]
    ) -> list[tuple[str, str, str]]:
        """(jti, kid, compact JWS) of each SET these events make for the stream, in order."""
        key = await self.keys.current(conn, stream.tenant_id)
        base = self.base_url()
        issuer, audience = issuer_of(base), audience_of(base, stream.id)
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
        out: list[tuple[str, str, str]] = []
        iat = int(time.time())
        for transaction in _transactions(records):
            decoded = [self.db.store.to_domain(r) for r in transaction]
            method: str | None = None
            for event in decoded:
                if isinstance(event, ProvisioningRequest.Event):
                    method = str(getattr(event, "request", {}).get("method") or "") or None
            # txn (RFC 9967 §2.2): the request's change id, the same on every stream.
            txn = transaction[0].request_id or f"tx-{transaction[0].transaction_id}"
            for change in sets.changes_of(decoded):
                rid = str(change.resource_id)
                entering: list[str] = []
                leaving: list[str] = []
                if members is not None:
                    if change.resource_type == "Group" and change.resource_id == stream.scope_group:
                        members.add(rid)
                        entering = [m for m in change.added if m not in members]
                        leaving = [m for m in change.removed if m in members]
                    if rid not in members and not entering and not leaving:
                        continue
                # An erased subject (issue 17): notices only, naming attributes, never values.
                erased = is_erased(change.resource_id)
                if erased:
                    change.external_id = None
                full = stream.full and not erased
                if full and change.data is None and method == "PUT":
                    change.data = await _resource_at(self.db, conn, change)
                events = sets.payload_events(change, method=method, full=full, wanted=stream.events)
                if events:
                    out.append(
                        self._sign(key, issuer, audience, iat, txn, sets.sub_id(change), events)
                    )
                if change.deleted and members is not None:
                    members.discard(rid)
                    left.append(rid)
                # RFC 9967 §2.3: a member that joins or leaves the scope group enters or
                # leaves the stream (after the group's own patch, in the same transaction).
                for member, uri, gone in [(m, sets.FEED_ADD, False) for m in entering] + [
                    (m, sets.FEED_REMOVE, True) for m in leaving
                ]:
                    assert members is not None
                    if gone:
                        members.discard(member)
                        left.append(member)
                    else:
                        members.add(member)
                        joined.append(member)
                    name = uri.removeprefix(sets.PREFIX)
                    if name in stream.events:
                        subject = sets.feed_subject("User", member, None)
                        out.append(self._sign(key, issuer, audience, iat, txn, subject, {uri: {}}))
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
        return out

    def _sign(
        self,
        key: Any,
        issuer: str,
        audience: str,
        iat: int,
        txn: str,
        subject: dict[str, Any],
        events: dict[str, Any],
    ) -> tuple[str, str, str]:
        jti = uuid.uuid4().hex
        claims = sets.claims(
            issuer=issuer,
            audience=audience,
            jti=jti,
            iat=iat,
            txn=txn,
            subject=subject,
            events=events,
        )
        return jti, key.kid, key.sign(claims)

    async def _record_error(self, conn: Conn, stream_id: uuid.UUID, error: Exception) -> None:
        text = f"{type(error).__name__}: {error}"[:2000]
        log.error("feed producer failed", stream=str(stream_id), error=text)
        with contextlib.suppress(Exception):
            await conn.execute(
                "UPDATE feed_streams SET last_error = $2 WHERE id = $1", stream_id, text
            )


def _transactions(records: Sequence[RecordedEvent]) -> list[list[RecordedEvent]]:
    out: list[list[RecordedEvent]] = []
    for record in records:
        if out and out[-1][0].transaction_id == record.transaction_id:
            out[-1].append(record)
        else:
            out.append([record])
    return out


async def _resource_at(db: Database, conn: Conn, change: sets.Change) -> dict[str, Any] | None:
    """The resource as it was right after the change (for `put:full` data), by replay."""
    aggregate: Any = None
    for record in await db.store.read_stream(conn, change.resource_id):
        if record.originator_version > change.version:
            break
        aggregate = db.store.to_domain(record).mutate(aggregate)  # type: ignore[attr-defined]
    if isinstance(aggregate, User):
        return sets.user_data(change.resource_id, aggregate.state_view)
    if isinstance(aggregate, Group):
        return sets.group_data(change.resource_id, aggregate.display_name, aggregate.external_id)
    return None
