"""The audit projection's own copy of each resource (`audit_resources`): the state before a
request, from which an entry's old values come. Each copy is sealed under its subject's data key
(infra.audit_sealing); an erased subject's copy cannot be opened and is left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import orjson

from domain.group import Group
from domain.schema import is_extension_urn
from domain.user import User
from infra import audit_sealing
from infra.eventstore import Conn

RESOURCES = "audit_resources"


def group_state(group: Group) -> dict[str, Any]:
    state: dict[str, Any] = {"displayName": group.display_name}
    if group.external_id is not None:
        state["externalId"] = group.external_id
    state.update(group.extensions)
    return state


def state_of(aggregate: Any) -> Mapping[str, Any] | None:
    """The attributes an entry lists; read at once, never kept (a user's is not a copy)."""
    if isinstance(aggregate, User):
        return aggregate.state_view
    if isinstance(aggregate, Group):
        return group_state(aggregate)
    return None


async def load(
    conn: Conn, events: Sequence[Any], recorded: Sequence[Any], tables: Mapping[str, str]
) -> dict[UUID, Any]:
    # By the primary key (tenant, id): one index probe per resource. (By id alone the whole
    # index was walked: 0.13 ms of PostgreSQL per POST /Users, growing with the table.)
    # A resource whose first event in the batch is its first of all (a POST's) has no copy
    # yet: only the others are read (a batch of creations reads nothing).
    first: dict[tuple[UUID, UUID], bool] = {}
    for e, r in zip(events, recorded, strict=True):
        if isinstance(e, User.Event | Group.Event):
            first.setdefault((r.tenant_id, e.originator_id), e.originator_version == 1)
    keys = [key for key, created in first.items() if not created]
    found: dict[UUID, Any] = {}
    if not keys:
        return found
    rows = await conn.fetch(
        f"SELECT r.tenant_id, r.id, r.type, r.version, r.state, r.created, r.modified"
        f" FROM {tables[RESOURCES]} r JOIN unnest($1::uuid[], $2::uuid[]) AS k (tenant_id, id)"
        " ON r.tenant_id = k.tenant_id AND r.id = k.id",
        [t for t, _ in keys],
        [i for _, i in keys],
    )
    ring = await audit_sealing.load(conn, (r["id"] for r in rows))
    for r in rows:
        state = audit_sealing.open_state(ring, r["tenant_id"], r["id"], r["state"])
        if state is None:
            continue  # its key is gone: the subject was erased (its row goes with it)
        if r["type"] == "User":
            found[r["id"]] = User.from_state(
                r["id"],
                r["version"],
                r["tenant_id"],
                state,
                r["created"],
                r["modified"],
                owned=True,
            )
        else:
            found[r["id"]] = Group.from_state(
                r["id"],
                r["version"],
                r["tenant_id"],
                state["displayName"],
                state.get("externalId"),
                r["created"],
                r["modified"],
                {key: value for key, value in state.items() if is_extension_urn(key)},
            )
    return found


def json_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as JSON for jsonb_to_recordset (ids read from the database are asyncpg's UUIDs,
    which orjson does not take as its own)."""
    return orjson.dumps(rows, default=_json_default).decode()


def _json_default(value: Any) -> Any:
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


async def save(conn: Conn, resources: Mapping[UUID, Any], tables: Mapping[str, str]) -> None:
    live, gone = [], []
    keys = await audit_sealing.load(conn, (r for r, a in resources.items() if a is not None))
    for rid, agg in resources.items():
        if agg is None:
            continue
        if (isinstance(agg, User) and agg.deprovisioned) or (
            isinstance(agg, Group) and agg.deleted
        ):
            gone.append((agg.tenant_id, rid))
            continue
        kind = "User" if isinstance(agg, User) else "Group"
        live.append(
            {
                "tenant_id": agg.tenant_id,
                "id": rid,
                "type": kind,
                "version": agg.version,
                "state": audit_sealing.seal_state(keys, agg.tenant_id, rid, state_of(agg)),
                "created": agg.created_on,
                "modified": agg.modified_on,
            }
        )
    if gone:
        await conn.execute(
            f"DELETE FROM {tables[RESOURCES]} r USING unnest($1::uuid[], $2::uuid[])"
            " AS g (tenant_id, id) WHERE r.tenant_id = g.tenant_id AND r.id = g.id",
            [t for t, _ in gone],
            [i for _, i in gone],
        )
    if live:
        # One JSON document, not 7 arrays (see projections.audit).
        await conn.execute(
            f"INSERT INTO {tables[RESOURCES]}"
            " (tenant_id, id, type, version, state, created, modified)"
            " SELECT * FROM jsonb_to_recordset($1::text::jsonb) AS r (tenant_id uuid, id uuid,"
            " type text, version bigint, state jsonb, created timestamptz, modified timestamptz)"
            " ON CONFLICT (tenant_id, id) DO UPDATE SET version = excluded.version,"
            " state = excluded.state, modified = excluded.modified",
            json_rows(live),
        )
