"""Who holds a taken value: a 409's detail quotes the userName (or group displayName) another
subject holds, so the request's record is sealed under that subject's key (issue 17,
infra.detail_sealing). Looked up after the refused write, its connection given back."""

from __future__ import annotations

from typing import Any
from uuid import UUID

_HOLDERS = {
    "User": "SELECT id FROM scim_users WHERE tenant_id = $1 AND lower(user_name) = lower($2)",
    "Group": "SELECT id FROM scim_groups WHERE tenant_id = $1 AND lower(display_name) = lower($2)",
}


async def holder_of(pool: Any, tenant_id: UUID, kind: str, value: str) -> UUID | None:
    """The user or group of the tenant holding `value` (the view's unique index's terms)."""
    found = await pool.fetchval(_HOLDERS[kind], tenant_id, value)
    return found if isinstance(found, UUID) else None
