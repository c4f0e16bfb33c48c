"""A group named in another subject's provisioning-log entry (issue 17).

When a request about a user changes a group (a deleted user leaves its groups), the entry's
modifiedProperties say `group <name>: members removed`. The attribute names of an entry stay
in clear (the shape of a change is not personal), so with group names personal
(`SCIMLEDGER_ENCRYPT_GROUP_NAMES`, on by default) the projection names the group by its id
there, and readers show the group's *current* displayName in its place (the SCIM view holds
it); a deleted or erased group reads by its id.
"""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

import orjson

from infra.keys import KeyRing

_LABEL = re.compile(r"group ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}): ")


def prefix(keys: KeyRing, group_id: UUID, name: Any) -> str:
    """How an entry about another subject names a group in its attribute names."""
    return f"group {group_id if keys.encrypt_group_names else name}: "


async def name_groups(conn: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries' rows (opened) with `group <id>: ` in attribute names shown as the group's
    current displayName, in place. One query for the page; each name is matched once, and only
    the rows that name a group are rewritten (an export reads thousands of rows a page)."""
    labelled: list[tuple[dict[str, Any], list[tuple[int, UUID, int]]]] = []
    wanted: set[tuple[UUID, UUID]] = set()
    for r in rows:
        properties = r.get("modified_properties")
        if type(properties) is str:
            if "group " not in properties:
                continue
            properties = r["modified_properties"] = orjson.loads(properties)
        found = []
        for i, p in enumerate(properties or ()):
            name = p.get("displayName", "")
            if type(name) is not str:
                name = str(name)
            if name.startswith("group ") and (label := _LABEL.match(name)):
                found.append((i, UUID(label.group(1)), label.end()))
                wanted.add((r["tenant_id"], found[-1][1]))
        if found:
            labelled.append((r, found))
    if not wanted:
        return rows
    # By the primary key (tenant, id): one index probe per group (by id alone, the whole index).
    names = {
        (g["tenant_id"], g["id"]): g["display_name"]
        for g in await conn.fetch(
            "SELECT g.tenant_id, g.id, g.display_name FROM scim_groups g"
            " JOIN unnest($1::uuid[], $2::uuid[]) AS k (tenant_id, id)"
            " ON g.tenant_id = k.tenant_id AND g.id = k.id",
            [t for t, _ in wanted],
            [i for _, i in wanted],
        )
    }
    for r, found in labelled:
        shown = list(r["modified_properties"])
        for i, group_id, end in found:
            name = names.get((r.get("tenant_id"), group_id))
            if name is not None:
                p = shown[i]
                shown[i] = {**p, "displayName": f"group {name}: {str(p['displayName'])[end:]}"}
        r["modified_properties"] = shown
    return rows
