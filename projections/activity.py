"""The activity view (`tenant_activity`): per tenant, users, groups, events, last change.

An asynchronous projection: a catch-up subscriber (projections/runner.py) applies events in
commit order and moves its checkpoint in the same transaction. Operators read it in
`scimledger tenants list`; it is cheap to keep because it only counts.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.utils import TopicError, resolve_topic

from infra.eventstore import Conn

NAME = "activity"
VERSION = 1
ACTIVITY = "tenant_activity"
TABLES = (ACTIVITY,)
LIVE: Mapping[str, str] = {ACTIVITY: ACTIVITY}
# It counts recorded events by their topic: replay and the runner need not decode any.
DECODES = False

_DELTAS = {
    "UserProvisioned": (1, 0),
    "UserDeprovisioned": (-1, 0),
    "GroupCreated": (0, 1),
    "GroupDeleted": (0, -1),
}


async def apply(
    conn: Conn,
    events: Sequence[Any],
    tables: Mapping[str, str] = LIVE,
    recorded: Sequence[Any] | None = None,
) -> None:
    assert recorded is not None, "the activity projection counts recorded events"
    totals: dict[UUID, list[Any]] = {}
    for record in recorded:
        row = totals.setdefault(record.tenant_id, [0, 0, 0, None])
        users, groups = _deltas(record.topic)
        row[0] += users
        row[1] += groups
        row[2] += 1
        if row[3] is None or record.recorded_at > row[3]:
            row[3] = record.recorded_at
    if not totals:
        return
    ids = list(totals)
    cols = list(zip(*(totals[t] for t in ids), strict=True))
    await conn.execute(
        f"""
        INSERT INTO {tables[ACTIVITY]} AS a
            (tenant_id, users, groups, events, last_event_at)
        SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[],
                             $5::timestamptz[])
        ON CONFLICT (tenant_id) DO UPDATE SET
            users = a.users + excluded.users, groups = a.groups + excluded.groups,
            events = a.events + excluded.events,
            last_event_at = greatest(a.last_event_at, excluded.last_event_at)
        """,
        ids,
        *[list(c) for c in cols],
    )


@functools.lru_cache(maxsize=256)
def _deltas(topic: str) -> tuple[int, int]:
    """Users and groups an event of this topic adds; by its class, so renamed topics count."""
    try:
        kind = resolve_topic(topic).__name__
    except TopicError:
        kind = topic.rpartition(".")[2]
    return _DELTAS.get(kind, (0, 0))


def describe(table: str, row: Mapping[str, Any]) -> str:
    return f"tenant {row.get('tenant_id')}"
