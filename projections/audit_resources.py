"""The audit projection's own copy of each resource (`audit_resources`): the state before a
request, from which an entry's old values come. Each copy is sealed under its subject's data key
(infra.audit_sealing); an erased subject's copy cannot be opened and is left out.

A rebuild's bulk replay keeps the copies it folds in memory between batches (`Held`) instead
of reading, opening, sealing and writing them back with every batch: the groups and busy users
are in nearly every batch, and their copies are the same either way. It writes a copy when it
leaves the memory (the least recently used beyond `HELD`) and the rest at the end (`flush`),
before anything reads the table in a transaction of its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from uuid import UUID

import orjson

from domain.group import Group
from domain.schema import is_extension_urn
from domain.user import User
from infra import audit_sealing
from infra.eventstore import Conn

RESOURCES = "audit_resources"
HELD = 20_000  # resources a rebuild keeps in memory between its batches
_FLUSH = 5000  # copies written by one statement at the end of a replay


class Held:
    """A replay's copies of the resources, most recently folded last, those not yet written
    in `dirty`. Nothing else writes the shadow table meanwhile, so these are its truth."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = HELD if limit is None else limit
        self.copies: OrderedDict[UUID, Any] = OrderedDict()
        self.dirty: set[UUID] = set()

    def drop(self, ids: Iterable[UUID]) -> None:
        """Gone from the table (deleted, or erased: its copy must never be written again)."""
        for rid in ids:
            self.copies.pop(rid, None)
            self.dirty.discard(rid)

    def keep(self, rid: UUID, aggregate: Any) -> None:
        self.copies[rid] = aggregate
        self.copies.move_to_end(rid)
        self.dirty.add(rid)

    def evict(self) -> list[Any]:
        """Beyond the limit, the least recently folded leave: those to write now."""
        out = []
        while len(self.copies) > self.limit:
            rid, aggregate = self.copies.popitem(last=False)
            if rid in self.dirty:
                self.dirty.discard(rid)
                out.append(aggregate)
        return out


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
    conn: Conn,
    events: Sequence[Any],
    recorded: Sequence[Any],
    tables: Mapping[str, str],
    held: Held | None = None,
) -> dict[UUID, Any]:
    # By the primary key (tenant, id): one index probe per resource. (By id alone the whole
    # index was walked: 0.13 ms of PostgreSQL per POST /Users, growing with the table.)
    # A resource whose first event in the batch is its first of all (a POST's) has no copy
    # yet: only the others are read (a batch of creations reads nothing).
    first: dict[tuple[UUID, UUID], bool] = {}
    for e, r in zip(events, recorded, strict=True):
        if isinstance(e, User.Event | Group.Event):
            first.setdefault((r.tenant_id, e.originator_id), e.originator_version == 1)
    found: dict[UUID, Any] = {}
    if held is not None:
        for _, rid in first:
            if rid in held.copies:
                found[rid] = held.copies[rid]
    keys = [key for key, created in first.items() if not created and key[1] not in found]
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


async def save(
    conn: Conn, resources: Mapping[UUID, Any], tables: Mapping[str, str], held: Held | None = None
) -> None:
    live, gone = [], []
    for rid, agg in resources.items():
        if agg is None:
            continue
        if (isinstance(agg, User) and agg.deprovisioned) or (
            isinstance(agg, Group) and agg.deleted
        ):
            gone.append((agg.tenant_id, rid))
        elif held is None:
            live.append(agg)
        else:
            held.keep(rid, agg)
    if held is not None:
        held.drop(rid for _, rid in gone)
        live = held.evict()
    if gone:
        await conn.execute(
            f"DELETE FROM {tables[RESOURCES]} r USING unnest($1::uuid[], $2::uuid[])"
            " AS g (tenant_id, id) WHERE r.tenant_id = g.tenant_id AND r.id = g.id",
            [t for t, _ in gone],
            [i for _, i in gone],
        )
    await _write(conn, live, tables)


async def flush(conn: Conn, held: Held, tables: Mapping[str, str]) -> None:
    """Write the copies a replay holds that the table does not have yet."""
    dirty = [held.copies[rid] for rid in held.copies if rid in held.dirty]
    held.copies.clear()
    held.dirty.clear()
    for start in range(0, len(dirty), _FLUSH):
        await _write(conn, dirty[start : start + _FLUSH], tables)


async def _write(conn: Conn, aggregates: Sequence[Any], tables: Mapping[str, str]) -> None:
    if not aggregates:
        return
    keys = await audit_sealing.load(conn, (a.id for a in aggregates))
    live = [
        {
            "tenant_id": agg.tenant_id,
            "id": agg.id,
            "type": "User" if isinstance(agg, User) else "Group",
            "version": agg.version,
            "state": audit_sealing.seal_state(keys, agg.tenant_id, agg.id, state_of(agg)),
            "created": agg.created_on,
            "modified": agg.modified_on,
        }
        for agg in aggregates
    ]
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
