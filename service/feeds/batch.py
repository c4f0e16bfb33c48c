"""One batch of the log made into one stream's SETs: decoded, built (build.py) and signed, for
the producer (service/feeds/producer.py), which stores them.

In a catch-up the producer builds the next batch ahead (`Ahead`), while the batch before is
signed and stored: the signers, PostgreSQL's COPY and the producer's build overlap instead of
taking turns. What was built ahead is used only if the step that takes it, holding the stream's
row locked, finds everything the build depended on unchanged (`Ahead.fits`): the checkpoint,
the stream's settings and epoch, the tenant's key, the issuer, and no subject whose values the
SETs carry erased since (an erasure waits for the lock, then rewrites what the step stored:
service/feeds/erasure.py). A scoped stream's batches are not built ahead (their members are
read and written in the step's transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from infra import collector
from infra.database import Database
from infra.eventstore import Conn, Position, RecordedEvent
from infra.keys import PERSONAL_MODULES, is_erased
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

_PERSONAL = tuple(m + ":" for m in PERSONAL_MODULES)


@dataclass(slots=True)
class Built:
    """A batch's SETs, built and (in a catch-up) being signed by the signer processes."""

    valued: Sequence[RecordedEvent]  # the events whose values the SETs carry
    erased: frozenset[uuid.UUID]  # their subjects erased when built
    tokens: list[Token] = field(default_factory=list)  # signed here
    chunks: list[asyncio.Future[list[Token]]] = field(default_factory=list)  # by the signers

    async def signed(self) -> list[Token]:
        if not self.chunks:
            return self.tokens
        return [token for chunk in await asyncio.gather(*self.chunks) for token in chunk]

    def drop(self) -> None:
        for chunk in self.chunks:
            chunk.cancel()


@dataclass(slots=True)
class Ahead:
    """The batch after `after`, read and built before the step that stores it."""

    after: Position
    depends: tuple[Any, ...]  # (stream, kid, epoch, base URL) as built
    records: list[RecordedEvent]
    built: Built | None  # None: none of the stream's tenant

    async def fits(self, conn: Conn, builder: Builder, depends: tuple[Any, ...]) -> bool:
        """Whether the step holding the stream's lock may store this as built."""
        if depends != self.depends:
            return False
        if self.built is None:
            return True
        await builder._erased(conn, self.built.valued)
        return erased_among(self.built.valued) == self.built.erased


def issuer_of(base: str) -> str:
    """RFC 9967 examples: `iss` is the provider; ours is the tenant's SCIM base URL."""
    return base.rstrip("/")


def audience_of(base: str, stream_id: uuid.UUID) -> str:
    """`aud`: the stream (RFC 9967 §2.3.1 Figure 2 names a feed by URL)."""
    origin = base.rstrip("/").removesuffix("/scim/v2")
    return f"{origin}/events/{stream_id}"


def erased_among(records: Sequence[RecordedEvent]) -> frozenset[uuid.UUID]:
    return frozenset(r.originator_id for r in records if is_erased(r.originator_id))


@contextlib.contextmanager
def young_objects_kept(catching_up: bool) -> Iterator[None]:
    """A catch-up batch's objects (events, changes, claims: tens per SET) live for its whole
    step, so the cyclic collector waits while a catch-up batch is built (infra/collector.py);
    refcounting frees the batch after, and what is left is collected as usual."""
    if not catching_up:
        yield
        return
    with collector.paused():
        yield


class Builder:
    """The producer's building of SETs (its steps and storing: producer.py)."""

    db: Database
    base_url: Callable[[], str]
    keys: KeyRing

    async def _build(
        self,
        conn: Conn,
        stream: Stream,
        records: Sequence[RecordedEvent],
        kid: str | None,
        epoch: int = 0,
    ) -> Built:
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
        built = Built(valued, erased_among(valued))
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
                built.chunks.append(asyncio.ensure_future(sign.pooled(out)))
                out = []
                # The loop's other work (the batch before's COPY, a poll) goes on meanwhile.
                await asyncio.sleep(0)
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
        if not built.chunks:
            built.tokens = sign.inline(out)
        elif out:
            built.chunks.append(asyncio.ensure_future(sign.pooled(out)))
        return built

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


async def _resource_at(db: Database, conn: Conn, change: sets.Change) -> dict[str, Any] | None:
    """The resource as it was right after the change (for `put:full` data; a group with its
    members), by replay of its stream up to the change's version."""
    events = [
        db.store.to_domain(record)
        for record in await db.store.read_stream(conn, change.resource_id)
        if record.originator_version <= change.version
    ]
    return sets.replayed(change.resource_id, events)
