"""The append of several requests' new streams in ONE statement (the group commit of
POST /Users, service/group_commit.py).

PostgreSQL's CPU is spent per transaction more than per row: 16 users in one statement cost
about a quarter of 16 statements, pipelined or not (issue 16). Each request's events keep its
own tenant and request id (its provisioning-log entry groups by them, projections/audit.py).

Only first events (new streams) are batched: they need neither the order nor the erasure
check of a later version (infra/eventstore_sql.py), and a clash of their keys is impossible
short of a repeated uuid4. A batch PostgreSQL refused wrote nothing, and the caller appends
each request alone, so each gets its own error or its own commit; a batch whose commit is
unknown (its connection lost mid-statement) fails every request in it, as a lone request's
would fail (service/group_commit.py, `wrote_nothing`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent

from infra import metrics
from infra.eventstore import Conn, RecordedEvent
from infra.records import appended

# The batch statement's own parameters; a view's statement riding on it numbers its own from
# BATCH_PARAMETERS + 1 (as for EventStore.append_with).
BATCH_PARAMETERS = 10
_APPEND_BATCH = """
WITH e AS (
    SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bytea[], $5::uuid[],
                         $6::text[])
        AS e (originator_id, originator_version, topic, state, tenant_id, request_id)
), new_keys AS (
    INSERT INTO subject_keys (subject_id, tenant_id, kek_version, wrapped)
    SELECT * FROM unnest($7::uuid[], $8::uuid[], $9::int[], $10::bytea[])
    ON CONFLICT DO NOTHING
), appended AS (
    INSERT INTO stored_events
        (originator_id, originator_version, topic, state, tenant_id, request_id)
    SELECT originator_id, originator_version, topic, state, tenant_id, request_id FROM e
    RETURNING originator_id, originator_version, notification_id, recorded_at, transaction_id
), also AS ({statement})
SELECT * FROM appended
"""


@dataclass(slots=True)
class Sealed:
    """One request's append, ready (EventStore.seal): its events as stored, the new subjects'
    keys to store with them, and the arguments of the view's statement for its rows."""

    tenant_id: UUID
    request_id: str | None
    stored: list[StoredEvent]
    new_keys: list[tuple[UUID, int, bytes]]
    rows: list[tuple[Any, ...]]


def statement(view: str) -> str:
    """The batch append with `view` (its parameters from BATCH_PARAMETERS + 1, one array per
    column of every request's rows) in the same statement."""
    return _APPEND_BATCH.format(statement=view)


async def append_batch(conn: Conn, sql: str, batch: Sequence[Sealed]) -> list[list[RecordedEvent]]:
    """Append every request of `batch` in one statement (outside a transaction: its own,
    committed when this returns); what each request's events were recorded as, in order.
    On an error the new keys stay cached: the caller appends each request alone with them,
    or forgets them if the batch's commit is unknown (service/group_commit.py)."""
    events = [(p, s) for p in batch for s in p.stored]
    keys = [(p.tenant_id, k) for p in batch for k in p.new_keys]
    rows = [r for p in batch for r in p.rows]
    started = time.perf_counter()
    try:
        appended_rows = await conn.fetch(
            sql,
            [s.originator_id for _, s in events],
            [s.originator_version for _, s in events],
            [s.topic for _, s in events],
            [s.state for _, s in events],
            [p.tenant_id for p, _ in events],
            [p.request_id for p, _ in events],
            [k[0] for _, k in keys],
            [t for t, _ in keys],
            [k[1] for _, k in keys],
            [k[2] for _, k in keys],
            *(list(column) for column in zip(*rows, strict=True)),
        )
    finally:
        metrics.APPEND_SECONDS.observe(time.perf_counter() - started)
    metrics.APPENDS.inc()
    metrics.EVENTS_APPENDED.inc(len(appended_rows))
    at = {(oid, v): (oid, n, when, tx) for oid, v, n, when, tx in appended_rows}
    return [appended(p.stored, at, p.tenant_id, p.request_id) for p in batch]
