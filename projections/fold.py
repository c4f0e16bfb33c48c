"""Folding a replayed batch into a view whose rows hold aggregates' end states (users, groups).

A batch spans several commits, and a unique value one of them freed (a delete, a rename) may be
taken by another: upserting row by row would trip a shadow table's unique index on such an
intermediate state. So the batch's rows are taken out first and their aggregates folded
forward from there; the caller writes back where they end up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from uuid import UUID

from infra.eventstore import Conn

A = TypeVar("A")


async def take_out_and_fold(
    conn: Conn,
    events: Sequence[Any],
    handles: tuple[type, ...],
    table: str,
    columns: str,
    from_row: Callable[[Any], A],
) -> tuple[list[Any], list[A]]:
    """The batch's events this view handles, and the end state of every aggregate they touch
    (None, i.e. never provisioned, left out); the aggregates' rows are deleted from `table`."""
    mine: list[Any] = [e for e in events if isinstance(e, handles)]
    if not mine:
        return [], []
    ids = list({e.originator_id for e in mine})
    aggregates: dict[UUID, A | None] = dict.fromkeys(ids)
    for row in await conn.fetch(
        f"DELETE FROM {table} WHERE id = any($1::uuid[]) RETURNING {columns}", ids
    ):
        aggregates[row["id"]] = from_row(row)
    for event in mine:
        aggregates[event.originator_id] = event.mutate(aggregates[event.originator_id])
    return mine, [a for a in aggregates.values() if a is not None]
