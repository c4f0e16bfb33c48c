"""The users view (`scim_users`): one row per provisioned user, as SCIM reads need it.

Inline: the write path updates it in the transaction that appends the user's events, so a GET
right after a write sees the write, and the unique index on (tenant, lower(userName)) refuses a
duplicate before anything commits. The row is a function of the aggregate, and the aggregate is
a fold of its events (the `@event` bodies in domain/user.py), so a rebuild that replays the
events through the same aggregate code and the same `write` produces the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from asyncpg import Pool

from domain.user import User
from infra import eventstore_batch as batch
from infra.eventstore import APPEND_PARAMETERS, Conn
from projections.fold import take_out_and_fold

NAME = "users"
# Bump when what the handlers write changes: `projections status` then says a rebuild is due.
VERSION = 1
USERS = "scim_users"
TABLES = (USERS,)
LIVE: Mapping[str, str] = {USERS: USERS}
# The events `apply` folds; a rebuild does not even decode the others.
HANDLES: tuple[type[User.Event], ...] = (User.Event,)

COLUMNS = (
    "tenant_id, id, user_name, external_id, active, display_name, manager_id, resource,"
    " version, created, last_modified"
)


_ON_CONFLICT = """
ON CONFLICT (tenant_id, id) DO UPDATE SET
    user_name = excluded.user_name, external_id = excluded.external_id,
    active = excluded.active, display_name = excluded.display_name,
    manager_id = excluded.manager_id, resource = excluded.resource,
    version = excluded.version, last_modified = excluded.last_modified
"""


def _upsert(table: str, first: int = 1, on_conflict: str = _ON_CONFLICT) -> str:
    """The upsert of rows given as 11 column arrays, numbered $first to $first+10."""
    n = [f"${first + i}" for i in range(11)]
    return f"""
INSERT INTO {table} ({COLUMNS})
SELECT * FROM unnest({n[0]}::uuid[], {n[1]}::uuid[], {n[2]}::text[], {n[3]}::text[],
                     {n[4]}::bool[], {n[5]}::text[], {n[6]}::uuid[], {n[7]}::jsonb[],
                     {n[8]}::bigint[], {n[9]}::timestamptz[], {n[10]}::timestamptz[])
{on_conflict}"""


def _upsert_one(table: str, first: int, on_conflict: str = _ON_CONFLICT) -> str:
    """The upsert of one row given as 11 values, numbered $first to $first+10 (no arrays to
    build and encode: the common write changes one user)."""
    n = [f"${first + i}" for i in range(11)]
    return f"""
INSERT INTO {table} ({COLUMNS})
VALUES ({n[0]}::uuid, {n[1]}::uuid, {n[2]}::text, {n[3]}::text, {n[4]}::bool, {n[5]}::text,
        {n[6]}::uuid, {n[7]}::jsonb, {n[8]}::bigint, {n[9]}::timestamptz, {n[10]}::timestamptz)
{on_conflict}"""


# The upserts that ride on the append of the users' events, in one statement (one round trip,
# one transaction): their parameters come after the append's (EventStore.append_with).
APPEND_UPSERT = _upsert(USERS, first=APPEND_PARAMETERS + 1)
APPEND_UPSERT_ONE = _upsert_one(USERS, first=APPEND_PARAMETERS + 1)
# A user just provisioned (version 1: POST /Users) has no row yet: a plain INSERT, without the
# speculative insertion ON CONFLICT makes (~0.015 ms of PostgreSQL per POST).
APPEND_INSERT_NEW = _upsert_one(USERS, first=APPEND_PARAMETERS + 1, on_conflict="")
# The same for the users of several requests, appended together (service/group_commit.py).
BATCH_APPEND_NEW = batch.statement(_upsert(USERS, first=batch.BATCH_PARAMETERS + 1, on_conflict=""))


def append_upsert(users: Sequence[User]) -> tuple[str, list[Any]]:
    """The upsert of these users' rows for EventStore.append_with, and its arguments."""
    rows = [row_of(u) for u in users]
    if len(rows) == 1:
        return APPEND_INSERT_NEW if users[0].version == 1 else APPEND_UPSERT_ONE, list(rows[0])
    return APPEND_UPSERT, [list(column) for column in zip(*rows, strict=True)]


def row_of(user: User) -> tuple[Any, ...]:
    state = user.state_view  # written as jsonb right away: key order and sharing don't matter
    manager = state.get("manager")
    return (
        user.tenant_id,
        user.id,
        state["userName"],
        state.get("externalId"),
        state.get("active"),
        state.get("displayName"),
        UUID(manager) if manager else None,
        state,
        user.version,
        user.created_on,
        user.modified_on,
    )


async def write(conn: Conn, users: Sequence[User], tables: Mapping[str, str] = LIVE) -> None:
    """Make the view agree with these aggregates: upsert the live ones, drop deprovisioned ones."""
    table = tables[USERS]
    live = [u for u in users if not u.deprovisioned]
    gone = [(u.tenant_id, u.id) for u in users if u.deprovisioned]
    if live:
        rows = [row_of(u) for u in live]
        await conn.execute(_upsert(table), *(list(col) for col in zip(*rows, strict=True)))
    if gone:
        await conn.execute(
            f"DELETE FROM {table} t USING unnest($1::uuid[], $2::uuid[]) AS g (tenant_id, id)"
            " WHERE t.tenant_id = g.tenant_id AND t.id = g.id",
            [g[0] for g in gone],
            [g[1] for g in gone],
        )


async def apply(conn: Conn, events: Sequence[Any], tables: Mapping[str, str] = LIVE) -> None:
    """Replay handler: fold a batch of events (any aggregates) into the given table."""
    _, users = await take_out_and_fold(conn, events, HANDLES, tables[USERS], COLUMNS, _from_row)
    await write(conn, users, tables)


def _from_row(row: Any) -> User:
    return User.from_state(
        row["id"],
        row["version"],
        row["tenant_id"],
        row["resource"],
        row["created"],
        row["last_modified"],
        owned=True,
    )


async def fetch_one(
    conn: Conn | Pool, tenant_id: UUID, user_id: UUID, extra: str | None = None
) -> Any:
    """One user's row, or None. `extra`: a SQL expression over the row `p` (as for a list
    page's, e.g. the user's groups), selected as the column `extra` in the same round trip."""
    return await conn.fetchrow(
        f"SELECT {COLUMNS}, {extra or 'NULL'} AS extra FROM scim_users p"
        " WHERE tenant_id = $1 AND id = $2",
        tenant_id,
        user_id,
    )


async def exists(conn: Conn, tenant_id: UUID, user_id: UUID) -> bool:
    found = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM scim_users WHERE tenant_id = $1 AND id = $2)",
        tenant_id,
        user_id,
    )
    return bool(found)


async def lock_row(conn: Conn, tenant_id: UUID, user_id: UUID) -> None:
    """Lock the user's row until the transaction ends."""
    await conn.execute(
        "SELECT 1 FROM scim_users WHERE tenant_id = $1 AND id = $2 FOR UPDATE", tenant_id, user_id
    )


def describe(table: str, row: Mapping[str, Any]) -> str:
    """How a diff sample names a row."""
    return f"user {row.get('user_name')!r} ({row.get('id')})"
