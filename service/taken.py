"""Who holds a taken value: a 409's detail quotes the userName (or group displayName, or the
value of a declared `uniqueness: server` extension attribute) another subject holds, so the
request's record is sealed under that subject's key (issue 17, infra.detail_sealing). Looked up
after the refused write, its connection given back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import orjson

from infra.schemas import VIEWS, index_key, literal, typed_sql

_HOLDERS = {
    "User": "SELECT id FROM scim_users WHERE tenant_id = $1 AND lower(user_name) = lower($2)",
    "Group": "SELECT id FROM scim_groups WHERE tenant_id = $1 AND lower(display_name) = lower($2)",
}


@dataclass(frozen=True, slots=True)
class Declared:
    """The value of a declared unique attribute a write was refused for, as its index reads it."""

    resource_type: str  # User or Group
    urn: str
    attribute: str
    case_exact: bool
    kind: str
    value: Any


# (User or Group, the userName or displayName), or a declared attribute's value
Held = tuple[str, str] | Declared


async def holder_of(pool: Any, tenant_id: UUID, held: Held) -> UUID | None:
    """The user or group of the tenant holding the value (the unique index's own terms)."""
    if isinstance(held, Declared):
        found = await pool.fetchval(*_declared_holder(tenant_id, held))
    else:
        found = await pool.fetchval(_HOLDERS[held[0]], tenant_id, held[1])
    return found if isinstance(found, UUID) else None


def _declared_holder(tenant_id: UUID, held: Declared) -> tuple[str, str]:
    """The query for the row the tenant's unique index of the attribute holds the value in:
    the index's expression over the view's column and over the value as a document of the same
    shape, under the index's own predicate (its tenant inline, so the planner can use it)."""
    table, column = VIEWS[held.resource_type]
    urn, name, exact, kind = held.urn, held.attribute, held.case_exact, held.kind
    probe = orjson.dumps({urn: {name: held.value}}).decode()
    sql = (
        f"SELECT id FROM {table} WHERE tenant_id = {literal(str(tenant_id))}::uuid"
        f" AND {typed_sql(column, urn, name, kind)} IS NOT NULL"
        f" AND {index_key(column, urn, name, exact, kind)}"
        f" = {index_key('($1::text::jsonb)', urn, name, exact, kind)} LIMIT 1"
    )
    return sql, probe
