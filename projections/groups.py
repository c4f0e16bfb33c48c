"""The groups view (`scim_groups`) and its membership rows (`scim_group_members`).

Inline, like the users view: updated in the transaction that appends the group's events. The
group row doubles as the group's snapshot for the write side (see service/unit_of_work.py):
membership is never held in memory, only applied to rows from `GroupMembershipChanged` deltas.
A rebuild replays the same events through the same `write`, into shadow tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from asyncpg import Pool

from domain.group import Group
from infra.eventstore import Conn
from projections.fold import take_out_and_fold

NAME = "groups"
# Bump when what the handlers write changes: `projections status` then says a rebuild is due.
VERSION = 1
GROUPS, MEMBERS = "scim_groups", "scim_group_members"
TABLES = (GROUPS, MEMBERS)
LIVE: Mapping[str, str] = {GROUPS: GROUPS, MEMBERS: MEMBERS}
# The events `apply` folds; a rebuild does not even decode the others.
HANDLES: tuple[type[Group.Event], ...] = (Group.Event,)

COLUMNS = (
    "tenant_id, id, display_name, external_id, version, created, last_modified, extensions"
)


def _upsert(groups: str) -> str:
    return f"""
INSERT INTO {groups} ({COLUMNS})
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[],
                     $6::timestamptz[], $7::timestamptz[], $8::jsonb[])
ON CONFLICT (tenant_id, id) DO UPDATE SET
    display_name = excluded.display_name, external_id = excluded.external_id,
    version = excluded.version, last_modified = excluded.last_modified,
    extensions = excluded.extensions
"""


# A member's type is settled when it joins: ids are UUIDs, so one is a group or a user.
def _add_members(groups: str, members: str) -> str:
    return f"""
INSERT INTO {members} (tenant_id, group_id, member_id, member_type, display)
SELECT m.tenant_id, m.group_id, m.member_id,
       CASE WHEN EXISTS (SELECT 1 FROM {groups} g
                         WHERE g.tenant_id = m.tenant_id AND g.id = m.member_id)
            THEN 'Group' ELSE 'User' END,
       m.display
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[])
     AS m (tenant_id, group_id, member_id, display)
ON CONFLICT DO NOTHING
"""


def _remove_members(members: str) -> str:
    return f"""
DELETE FROM {members} t
USING unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS m (tenant_id, group_id, member_id)
WHERE t.tenant_id = m.tenant_id AND t.group_id = m.group_id AND t.member_id = m.member_id
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
        group.extensions or None,
    )


async def write(
    conn: Conn,
    groups: Sequence[Group],
    events: Sequence[Any],
    tables: Mapping[str, str] = LIVE,
) -> None:
    """Make the tables agree with these groups and the membership deltas among `events`.

    Deltas are netted per (group, member) in event order, so a batch of any size is two
    statements: one delete (anyone removed along the way), one insert (members at the end).
    """
    t_groups, t_members = tables[GROUPS], tables[MEMBERS]
    live = [g for g in groups if not g.deleted]
    if live:
        rows = [row_of(g) for g in live]
        await conn.execute(_upsert(t_groups), *(list(col) for col in zip(*rows, strict=True)))
    tenant = {g.id: g.tenant_id for g in groups}
    removed: set[tuple[UUID, UUID, str]] = set()
    final: dict[tuple[UUID, UUID, str], str | bool | None] = {}
    for event in events:
        if type(event).__name__ != "GroupMembershipChanged":
            continue
        group_id = event.originator_id
        for member in event.removed:
            key = (tenant[group_id], group_id, member)
            removed.add(key)
            final[key] = False
        for member in event.added:
            final[(tenant[group_id], group_id, member)] = event.displays.get(member)
    if removed:
        await conn.execute(_remove_members(t_members), *_columns(removed))
    adds = [(*key, display) for key, display in final.items() if display is not False]
    if adds:
        await conn.execute(_add_members(t_groups, t_members), *_columns(adds))
    gone = [g for g in groups if g.deleted]
    if gone:
        ids = ([g.tenant_id for g in gone], [g.id for g in gone])
        await conn.execute(
            f"DELETE FROM {t_members} t USING unnest($1::uuid[], $2::uuid[]) AS g (tid, gid)"
            " WHERE t.tenant_id = g.tid AND t.group_id = g.gid",
            *ids,
        )
        await conn.execute(
            f"DELETE FROM {t_groups} t USING unnest($1::uuid[], $2::uuid[]) AS g (tid, gid)"
            " WHERE t.tenant_id = g.tid AND t.id = g.gid",
            *ids,
        )


def _columns(rows: Any) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)]


async def apply(conn: Conn, events: Sequence[Any], tables: Mapping[str, str] = LIVE) -> None:
    """Replay handler: fold a batch of events (any aggregates) into the given tables; the
    membership rows stay where they are."""
    mine, groups = await take_out_and_fold(
        conn, events, HANDLES, tables[GROUPS], COLUMNS, _from_row
    )
    if mine:
        await write(conn, groups, mine, tables)


def _from_row(row: Any) -> Group:
    return Group.from_state(
        row["id"],
        row["version"],
        row["tenant_id"],
        row["display_name"],
        row["external_id"],
        row["created"],
        row["last_modified"],
        row["extensions"],
    )


async def load_for_update(conn: Conn, tenant_id: UUID, group_id: UUID) -> Group | None:
    """The group's snapshot from its row, locked until the transaction ends."""
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM scim_groups WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
        tenant_id,
        group_id,
    )
    return None if row is None else _from_row(row)


async def fetch(conn: Conn | Pool, tenant_id: UUID, ids: Sequence[UUID]) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT {COLUMNS} FROM scim_groups WHERE tenant_id = $1 AND id = any($2::uuid[])",
            tenant_id,
            list(ids),
        )
    )


def describe(table: str, row: Mapping[str, Any]) -> str:
    """How a diff sample names a row."""
    if table == GROUPS:
        return f"group {row.get('display_name')!r} ({row.get('id')})"
    return f"member {row.get('member_id')} of group {row.get('group_id')}"
