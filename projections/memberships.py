"""The membership rows (`scim_group_members`, written by projections/groups.py), as the write
path and the read path ask about them.

`Memberships` is the write side's repository: the unit of work hands it out bound to its
transaction, so the handlers never run SQL. The module functions serve the read path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from uuid import UUID

from asyncpg import Pool, Record

from infra.eventstore import Conn

MEMBER_PAGE = 2000


class Memberships:
    """The membership rows one transaction sees; `begin` gives its connection."""

    def __init__(self, begin: Callable[[], Awaitable[Conn]], tenant_id: UUID) -> None:
        self._begin = begin
        self.tenant_id = tenant_id

    async def members(self, group_id: UUID) -> set[UUID]:
        """Every current member of the group."""
        rows = await (await self._begin()).fetch(
            "SELECT member_id FROM scim_group_members WHERE tenant_id = $1 AND group_id = $2",
            self.tenant_id,
            group_id,
        )
        return {r["member_id"] for r in rows}

    async def members_among(self, group_id: UUID, ids: set[UUID]) -> set[UUID]:
        """Which of `ids` are members of the group."""
        rows = await (await self._begin()).fetch(
            "SELECT member_id FROM scim_group_members"
            " WHERE tenant_id = $1 AND group_id = $2 AND member_id = any($3::uuid[])",
            self.tenant_id,
            group_id,
            list(ids),
        )
        return {r["member_id"] for r in rows}

    async def joinable(self, ids: set[UUID]) -> tuple[set[UUID], list[UUID]]:
        """Which of `ids` are users or groups of this tenant, and which of those are groups.

        The rows are locked for share, so a member cannot be deleted while it joins."""
        conn, ordered = await self._begin(), sorted(ids)
        users = await conn.fetch(
            "SELECT id FROM scim_users WHERE tenant_id = $1 AND id = any($2::uuid[]) FOR SHARE",
            self.tenant_id,
            ordered,
        )
        groups = await conn.fetch(
            "SELECT id FROM scim_groups WHERE tenant_id = $1 AND id = any($2::uuid[]) FOR SHARE",
            self.tenant_id,
            ordered,
        )
        nested = [r["id"] for r in groups]
        return {r["id"] for r in users} | set(nested), nested

    async def would_contain_itself(self, group_id: UUID, nested: list[UUID]) -> bool:
        """Whether nesting these groups into the group makes a cycle.

        Two requests nesting groups into each other at once could each see no cycle; one lock
        per tenant orders them (nesting is rare, plain membership never takes it)."""
        conn = await self._begin()
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1::text))", str(self.tenant_id))
        cycle = await conn.fetchval(
            """
            WITH RECURSIVE below(id) AS (
                SELECT unnest($2::uuid[])
                UNION
                SELECT m.member_id FROM scim_group_members m JOIN below b ON m.group_id = b.id
                WHERE m.tenant_id = $1 AND m.member_type = 'Group'
            )
            SELECT EXISTS (SELECT 1 FROM below WHERE id = $3)
            """,
            self.tenant_id,
            nested,
            group_id,
        )
        return bool(cycle)

    async def groups_of(self, member_id: UUID) -> list[UUID]:
        """The groups `member_id` is directly in, in one order, as this transaction sees them."""
        rows = await (await self._begin()).fetch(
            "SELECT group_id FROM scim_group_members WHERE tenant_id = $1 AND member_id = $2"
            " ORDER BY group_id",
            self.tenant_id,
            member_id,
        )
        return [row["group_id"] for row in rows]


# -- the read path ------------------------------------------------------------------------


async def member_page(
    conn: Conn, tenant_id: UUID, group_id: UUID, after: UUID | None
) -> list[Record]:
    """Up to MEMBER_PAGE members in member_id order, after `after` (a keyset page: an index
    range of the primary key, however deep into the group)."""
    if after is None:
        return list(
            await conn.fetch(
                "SELECT member_id, member_type, display FROM scim_group_members"
                " WHERE tenant_id = $1 AND group_id = $2 ORDER BY member_id LIMIT $3",
                tenant_id,
                group_id,
                MEMBER_PAGE,
            )
        )
    return list(
        await conn.fetch(
            "SELECT member_id, member_type, display FROM scim_group_members"
            " WHERE tenant_id = $1 AND group_id = $2 AND member_id > $3"
            " ORDER BY member_id LIMIT $4",
            tenant_id,
            group_id,
            after,
            MEMBER_PAGE,
        )
    )


async def members_of_groups(
    conn: Conn | Pool, tenant_id: UUID, group_ids: Sequence[UUID]
) -> list[Record]:
    """Every member of these groups, by group, then member."""
    return list(
        await conn.fetch(
            "SELECT group_id, member_id, member_type, display FROM scim_group_members"
            " WHERE tenant_id = $1 AND group_id = any($2::uuid[]) ORDER BY group_id, member_id",
            tenant_id,
            list(group_ids),
        )
    )


async def groups_of_members(
    conn: Conn | Pool, tenant_id: UUID, member_ids: Sequence[UUID]
) -> list[Record]:
    """(member_id, id, display_name) of each member's direct groups, by displayName."""
    return list(
        await conn.fetch(
            "SELECT m.member_id, g.id, g.display_name FROM scim_group_members m"
            " JOIN scim_groups g ON g.tenant_id = m.tenant_id AND g.id = m.group_id"
            " WHERE m.tenant_id = $1 AND m.member_id = any($2::uuid[])"
            " ORDER BY lower(g.display_name), g.id",
            tenant_id,
            list(member_ids),
        )
    )


# The `groups` of a page's user `p`, in the page's query (one round trip less than
# groups_of_members): [[group id, displayName], ...] in its order, or NULL.
GROUPS_OF_ROW = (
    "(SELECT jsonb_agg(jsonb_build_array(g.id, g.display_name)"
    " ORDER BY lower(g.display_name), g.id)"
    " FROM scim_group_members m"
    " JOIN scim_groups g ON g.tenant_id = m.tenant_id AND g.id = m.group_id"
    " WHERE m.tenant_id = p.tenant_id AND m.member_id = p.id)"
)


async def group_version(conn: Conn, tenant_id: UUID, group_id: UUID) -> Any:
    return await conn.fetchval(
        "SELECT version FROM scim_groups WHERE tenant_id = $1 AND id = $2", tenant_id, group_id
    )
