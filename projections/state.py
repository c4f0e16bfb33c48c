"""`projection_state`: each projection's stored version, lifecycle, checkpoint and last error.

Every query of the table is here: the runners advance checkpoints, a rebuild records the state
it swapped in, `projections status` and /metrics read checkpoints, the audit pages the lag.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import asyncpg

from infra.database import Database
from infra.eventstore import START, Conn, Position
from projections.registry import Projection


async def checkpoint(conn: Conn, name: str, *, lock: bool = False) -> Position:
    """Where the projection's view stands (START if it never ran). `lock`: hold its row until
    the transaction ends (the runner's step, a rebuild's swap: one at a time)."""
    row = await conn.fetchrow(
        "SELECT checkpoint_transaction, checkpoint_position FROM projection_state WHERE name = $1"
        + (" FOR UPDATE" if lock else ""),
        name,
    )
    return Position(row[0], row[1]) if row else START


async def checkpoints(conn: Conn, names: Sequence[str]) -> dict[str, Position]:
    """The checkpoints of these projections (START for one that never ran)."""
    rows = await conn.fetch(
        "SELECT name, checkpoint_transaction, checkpoint_position FROM projection_state"
        " WHERE name = any($1::text[])",
        list(names),
    )
    found = {r["name"]: Position(r[1], r[2]) for r in rows}
    return {name: found.get(name, START) for name in names}


async def advance(conn: Conn, name: str, position: Position) -> None:
    """The runner applied events up to `position` (in the caller's transaction)."""
    await conn.execute(
        "UPDATE projection_state SET checkpoint_transaction = $2,"
        " checkpoint_position = $3, last_error = NULL, updated_at = now()"
        " WHERE name = $1",
        name,
        position[0],
        position[1],
    )


async def record_error(conn: Conn, name: str, text: str) -> None:
    await conn.execute(
        "UPDATE projection_state SET last_error = $2, updated_at = now() WHERE name = $1",
        name,
        text,
    )


async def record_state(
    conn: Conn, projection: Projection, position: Position, *, rebuilt: bool = False
) -> None:
    await conn.execute(
        """
        INSERT INTO projection_state (name, version, mode, checkpoint_transaction,
                                      checkpoint_position, rebuilt_at, updated_at)
        VALUES ($1, $2, $3, $4, $5, CASE WHEN $6 THEN now() END, now())
        ON CONFLICT (name) DO UPDATE SET
            version = excluded.version, mode = excluded.mode,
            checkpoint_transaction = excluded.checkpoint_transaction,
            checkpoint_position = excluded.checkpoint_position,
            rebuilt_at = coalesce(excluded.rebuilt_at, projection_state.rebuilt_at),
            last_error = NULL, updated_at = now()
        """,
        projection.name,
        projection.version,
        projection.mode,
        position[0],
        position[1],
        rebuilt,
    )


async def register(conn: Conn, projections: Sequence[Projection]) -> None:
    """Record projections seen for the first time at the code's version (they were built by it:
    inline projections from the first event on)."""
    for p in projections:
        await conn.execute(
            "INSERT INTO projection_state (name, version, mode) VALUES ($1, $2, $3)"
            " ON CONFLICT (name) DO NOTHING",
            p.name,
            p.version,
            p.mode,
        )


async def _behind(conn: Conn, row: Any) -> int:
    position = (row["checkpoint_transaction"], row["checkpoint_position"]) if row else (0, 0)
    count = await conn.fetchval(
        "SELECT count(*) FROM stored_events"
        " WHERE (transaction_id, notification_id) > ($1::bigint, $2::bigint)",
        *position,
    )
    return int(count)


async def status(db: Database, projections: Sequence[Projection]) -> list[dict[str, Any]]:
    """Name, version (code and stored), checkpoint, events behind, last error."""
    async with db.pool.acquire() as conn:
        head = await conn.fetchrow(
            "SELECT coalesce(max(notification_id), 0) AS head, count(*) AS events"
            " FROM stored_events"
        )
        assert head is not None
        stored = {r["name"]: r for r in await conn.fetch("SELECT * FROM projection_state")}
        out = []
        for p in projections:
            row = stored.get(p.name)
            out.append(
                {
                    "name": p.name,
                    "mode": p.mode,
                    "version": p.version,
                    "stored_version": row["version"] if row else None,
                    # Inline projections are written in the append's own transaction.
                    "checkpoint": head["head"]
                    if p.mode == "inline"
                    else (row["checkpoint_position"] if row else 0),
                    "events_behind": 0 if p.mode == "inline" else await _behind(conn, row),
                    "rebuilt_at": row["rebuilt_at"].isoformat()
                    if row and row["rebuilt_at"]
                    else None,
                    "last_error": row["last_error"] if row else None,
                    "needs_rebuild": row is None or row["version"] != p.version,
                }
            )
        return out


async def tenant_lag(
    conn: Conn | asyncpg.Pool, name: str, tenant_id: UUID, cap: int
) -> int | None:
    """How many of the tenant's newest `cap` events the projection has yet to apply (None if it
    never ran). Reads at most `cap` rows, and only the tenant's own (its index, newest first)."""
    behind: int | None = await conn.fetchval(
        "SELECT (SELECT count(*) FROM ("
        "  SELECT e.transaction_id, e.notification_id FROM stored_events e"
        "  WHERE e.tenant_id = $2 ORDER BY e.notification_id DESC LIMIT $3) recent"
        "  WHERE (recent.transaction_id, recent.notification_id)"
        "   > (s.checkpoint_transaction, s.checkpoint_position))"
        " FROM projection_state s WHERE s.name = $1",
        name,
        tenant_id,
        cap,
    )
    return behind
