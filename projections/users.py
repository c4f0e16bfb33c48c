"""The users view (`scim_users`): one row per provisioned user, as SCIM reads need it.

Inline: the write path updates it in the transaction that appends the user's events, so a GET
right after a write sees the write, and the unique index on (tenant, lower(userName)) refuses a
duplicate before anything commits. The row is a function of the aggregate, and the aggregate is
a fold of its events (the `@event` bodies in domain/user.py), so a rebuild that replays the
events through the same aggregate code writes the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from asyncpg import Pool

from domain.user import User
from infra.eventstore import Conn

NAME = "users"

COLUMNS = (
    "tenant_id, id, user_name, external_id, active, display_name, manager_id, resource,"
    " version, created, last_modified"
)

_UPSERT = f"""
INSERT INTO scim_users ({COLUMNS})
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bool[], $6::text[],
                     $7::uuid[], $8::jsonb[], $9::bigint[], $10::timestamptz[], $11::timestamptz[])
ON CONFLICT (tenant_id, id) DO UPDATE SET
    user_name = excluded.user_name, external_id = excluded.external_id,
    active = excluded.active, display_name = excluded.display_name,
    manager_id = excluded.manager_id, resource = excluded.resource,
    version = excluded.version, last_modified = excluded.last_modified
"""


def row_of(user: User) -> tuple[Any, ...]:
    state = user.state
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


async def write(conn: Conn, users: Sequence[User], table: str = "scim_users") -> None:
    """Make the view agree with these aggregates: upsert the live ones, drop deprovisioned ones."""
    live = [u for u in users if not u.deprovisioned]
    gone = [(u.tenant_id, u.id) for u in users if u.deprovisioned]
    if live:
        rows = [row_of(u) for u in live]
        await conn.execute(
            _UPSERT.replace("scim_users", table), *(list(col) for col in zip(*rows, strict=True))
        )
    if gone:
        await conn.execute(
            f"DELETE FROM {table} t USING unnest($1::uuid[], $2::uuid[]) AS g (tenant_id, id)"
            " WHERE t.tenant_id = g.tenant_id AND t.id = g.id",
            [g[0] for g in gone],
            [g[1] for g in gone],
        )


async def fetch(conn: Conn | Pool, tenant_id: UUID, ids: Sequence[UUID]) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT {COLUMNS} FROM scim_users WHERE tenant_id = $1 AND id = any($2::uuid[])",
            tenant_id,
            list(ids),
        )
    )
