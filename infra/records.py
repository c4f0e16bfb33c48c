"""What the event store hands out and refuses: positions in the log, recorded events, the
errors of a lost append, and the events this process committed lately (RecentEvents).
`infra.eventstore` re-exports them all."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import StoredEvent


class ConcurrencyError(Exception):
    """Another writer appended to the stream first: reload and retry, or answer 412/409."""

    def __init__(self, originator_id: UUID) -> None:
        super().__init__(f"stream {originator_id} was appended to concurrently")
        self.originator_id = originator_id


class OutOfOrder(ConcurrencyError):
    """The stream's previous version was written by a transaction with a higher id than ours
    (see q.INSERT): nothing was appended; the same change succeeds in a new transaction."""

    def __init__(self, originator_id: UUID) -> None:
        Exception.__init__(
            self, f"stream {originator_id}: a newer transaction wrote the previous version"
        )
        self.originator_id = originator_id


class Position(NamedTuple):
    """A follower's place in the log. Order is (transaction_id, notification_id)."""

    transaction_id: int
    notification_id: int


START = Position(0, 0)


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    originator_id: UUID
    originator_version: int
    topic: str
    state: bytes
    notification_id: int
    tenant_id: UUID
    recorded_at: datetime
    request_id: str | None
    transaction_id: int

    @property
    def position(self) -> Position:
        return Position(self.transaction_id, self.notification_id)

    def stored(self) -> StoredEvent:
        return StoredEvent(self.originator_id, self.originator_version, self.topic, self.state)


# Events this process committed lately, kept for its own followers (see RecentEvents).
RECENT_EVENTS = 4096


class RecentEvents:
    """The domain events this process committed lately, by notification_id, as written.

    A fast path for the followers in this process (the audit projection's runner), which would
    otherwise decode (and unseal) the very events that were just encoded. The store stays the
    source of truth: a follower reads its batch from the log (which events, in which order);
    only an event found here under the same stream and version is not decoded again. Events of
    other processes, from before a restart, or older than the last RECENT_EVENTS are decoded.
    Bounded: the oldest go first.
    """

    def __init__(self, cap: int = RECENT_EVENTS) -> None:
        self.cap = cap
        self._events: dict[int, DomainEventProtocol[UUID]] = {}

    def remember(
        self, recorded: Sequence[RecordedEvent], events: Iterable[DomainEventProtocol[UUID]]
    ) -> None:
        """After the commit of `recorded`: the domain events they store (any order)."""
        if not self.cap:  # no follower in this process reads them
            return
        by_stream = {(e.originator_id, e.originator_version): e for e in events}
        for r in recorded:
            event = by_stream.get((r.originator_id, r.originator_version))
            if event is not None:
                self._events[r.notification_id] = event
        while len(self._events) > self.cap:
            del self._events[next(iter(self._events))]

    def get(self, recorded: RecordedEvent) -> DomainEventProtocol[UUID] | None:
        event = self._events.get(recorded.notification_id)
        if event is None or event.originator_id != recorded.originator_id:
            return None
        return event if event.originator_version == recorded.originator_version else None

    def clear(self) -> None:
        self._events.clear()

    def __len__(self) -> int:
        return len(self._events)


def stream_named(stored: Iterable[StoredEvent], message: str) -> UUID:
    """The stream among `stored` that an error's message (or detail) names; the first if none."""
    first: UUID | None = None
    for s in stored:
        if first is None:
            first = UUID(str(s.originator_id))
        if str(s.originator_id) in message:
            return UUID(str(s.originator_id))
    assert first is not None, "an append of no events"
    return first


def appended(
    stored: Iterable[StoredEvent],
    at: dict[tuple[Any, int], tuple[UUID, int, datetime, int]],
    tenant_id: UUID,
    request_id: str | None,
) -> list[RecordedEvent]:
    """`stored` as an append recorded them: `at` maps (originator_id, originator_version) to
    the row its statement returned (originator_id, notification_id, recorded_at,
    transaction_id)."""
    out = []
    for s in stored:
        oid, n, when, tx = at[(s.originator_id, s.originator_version)]
        out.append(RecordedEvent(oid, s.originator_version, s.topic, s.state, n,
                                 tenant_id, when, request_id, tx))  # fmt: skip
    return out
