"""The groups view (`scim_groups`) and its membership rows (`scim_group_members`).

Inline, like the users view: updated in the transaction that appends the group's events. The
group row doubles as the group's snapshot for the write side (see service/unit_of_work.py):
membership is never held in memory, only applied to rows from `GroupMembershipChanged` deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from asyncpg import Pool

from domain.group import Group
from infra.eventstore import Conn

NAME = "groups"

COLUMNS = "tenant_id, id, display_name, external_id, version, created, last_modified"

_UPSERT = f"""
INSERT INTO scim_groups ({COLUMNS})
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[],
                     $6::timestamptz[], $7::timestamptz[])
ON CONFLICT (tenant_id, id) DO UPDATE SET
    display_name = excluded.display_name, external_id = excluded.external_id,
    version = excluded.version, last_modified = excluded.last_modified
"""

# A member's type is settled when it joins: ids are UUIDs, so one is a group or a user.
_ADD_MEMBERS = """
INSERT INTO scim_group_members (tenant_id, group_id, member_id, member_type, display)
SELECT $1, $2, m.id,
       CASE WHEN EXISTS (SELECT 1 FROM scim_groups g WHERE g.tenant_id = $1 AND g.id = m.id)
            THEN 'Group' ELSE 'User' END,
       m.display
FROM unnest($3::uuid[], $4::text[]) AS m (id, display)
ON CONFLICT DO NOTHING
"""

_REMOVE_MEMBERS = """
DELETE FROM scim_group_members
WHERE tenant_id = $1 AND group_id = $2 AND member_id = any($3::uuid[])
"""


def row_of(group: Group) -> tuple[Any, ...]:
    return (
        group.tenant_id,
        group.id,
        group.display_name,
        group.external_id,
        group.version,
        group.created_on,
        group.modified_on,
    )


async def write(conn: Conn, groups: Sequence[Group], events: Sequence[Any]) -> None:
    """Apply the groups' new state and the membership deltas among `events`, in order."""
    live = [g for g in groups if not g.deleted]
    if live:
        rows = [row_of(g) for g in live]
        await conn.execute(_UPSERT, *(list(col) for col in zip(*rows, strict=True)))
    tenant = {g.id: g.tenant_id for g in groups}
    for event in events:
        kind = type(event).__name__
        if kind == "GroupMembershipChanged":
            group_id = event.originator_id
            if event.removed:
                await conn.execute(_REMOVE_MEMBERS, tenant[group_id], group_id, event.removed)
            if event.added:
                displays = [event.displays.get(m) for m in event.added]
                await conn.execute(_ADD_MEMBERS, tenant[group_id], group_id, event.added, displays)
    gone = [g for g in groups if g.deleted]
    if gone:
        tenants = [g.tenant_id for g in gone]
        ids = [g.id for g in gone]
        await conn.execute(
            "DELETE FROM scim_group_members t USING unnest($1::uuid[], $2::uuid[]) AS g (tid, gid)"
            " WHERE t.tenant_id = g.tid AND t.group_id = g.gid",
            tenants,
            ids,
        )
        await conn.execute(
            "DELETE FROM scim_groups t USING unnest($1::uuid[], $2::uuid[]) AS g (tid, gid)"
            " WHERE t.tenant_id = g.tid AND t.id = g.gid",
            tenants,
            ids,
        )


async def load_for_update(conn: Conn, tenant_id: UUID, group_id: UUID) -> Group | None:
    """The group's snapshot from its row, locked until the transaction ends."""
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM scim_groups WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
        tenant_id,
        group_id,
    )
    if row is None:
        return None
    return Group.from_state(
        row["id"],
        row["version"],
        row["tenant_id"],
        row["display_name"],
        row["external_id"],
        row["created"],
        row["last_modified"],
    )


async def fetch(conn: Conn | Pool, tenant_id: UUID, ids: Sequence[UUID]) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT {COLUMNS} FROM scim_groups WHERE tenant_id = $1 AND id = any($2::uuid[])",
            tenant_id,
            list(ids),
        )
    )
