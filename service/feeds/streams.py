"""Event streams (one per consumer): what an operator creates, lists, pauses, resets.

A stream belongs to one tenant, delivers by poll (RFC 8936, its own `feed` token) or by push
(RFC 8935, to one URL), publishes the events it names (RFC 9967 §2.3-2.4), in notice or full
form, optionally only for the members of one group.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from infra.eventstore import Conn, Position
from infra.tenants import UnknownTenant, issue_feed_token
from service.feeds.sets import EVENT_NAMES
from service.feeds.targets import check_endpoint

COLUMNS = (
    "s.id, s.tenant_id, t.name AS tenant, s.name, s.delivery, s.endpoint, s.events,"
    " s.full_data, s.scope_group, s.token_id, s.paused_at, s.checkpoint_transaction,"
    " s.checkpoint_position, s.produced, s.delivered + coalesce((SELECT d.delivered"
    " FROM feed_delivered d WHERE d.stream_id = s.id), 0) AS delivered,"
    " s.failing_since, s.last_error,"
    " s.created_at, (SELECT count(*) FROM feed_sets f WHERE f.stream_id = s.id) AS pending"
)


class StreamError(Exception):
    """An operator's request that cannot be done (bad argument, unknown stream): exit 2."""


@dataclass(frozen=True, slots=True)
class Stream:
    id: uuid.UUID
    tenant_id: uuid.UUID
    tenant: str
    name: str
    delivery: str
    endpoint: str | None
    events: frozenset[str]
    full: bool
    scope_group: uuid.UUID | None
    token_id: uuid.UUID | None
    paused: bool

    @classmethod
    def of(cls, row: asyncpg.Record) -> Stream:
        return cls(
            row["id"],
            row["tenant_id"],
            row["tenant"],
            row["name"],
            row["delivery"],
            row["endpoint"],
            frozenset(row["events"]),
            row["full_data"],
            row["scope_group"],
            row["token_id"],
            row["paused_at"] is not None,
        )


def parse_events(raw: str | None) -> list[str]:
    if raw is None:
        return list(EVENT_NAMES)
    names = [n.strip() for n in raw.split(",") if n.strip()][: len(EVENT_NAMES) + 1]
    unknown = [n for n in names if n not in EVENT_NAMES]
    if unknown or not names:
        raise StreamError(
            f"--events: unknown event {unknown[0]!r}" if unknown else "--events names none"
        )
    return sorted(set(names), key=EVENT_NAMES.index)


async def _head(conn: Conn) -> Position:
    """The log's committed end, in follower order: a stream started here sees what follows."""
    row = await conn.fetchrow(
        "SELECT transaction_id, notification_id FROM stored_events"
        " ORDER BY transaction_id DESC, notification_id DESC LIMIT 1"
    )
    return Position(row[0], row[1]) if row else Position(0, 0)


async def create(
    conn: Conn,
    *,
    tenant: str,
    name: str,
    endpoint: str | None,
    events: Sequence[str],
    full: bool,
    scope_group: uuid.UUID | None,
    from_start: bool = False,
) -> dict[str, Any]:
    """Create a stream; a poll stream gets its token (returned once, as `token`)."""
    if not name or len(name) > 200:
        raise StreamError("--name must be 1 to 200 characters")
    if endpoint is not None:
        check_endpoint(endpoint)
    async with conn.transaction():
        tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
        if tenant_id is None:
            raise UnknownTenant(tenant)
        stream_id = uuid.uuid4()
        token = None
        if endpoint is None:
            token = await issue_feed_token(conn, tenant_id, tenant, f"feed:{name}")
        start = Position(0, 0) if from_start else await _head(conn)
        try:
            await conn.execute(
                "INSERT INTO feed_streams (id, tenant_id, name, delivery, endpoint, events,"
                " full_data, scope_group, token_id, checkpoint_transaction, checkpoint_position)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                stream_id,
                tenant_id,
                name,
                "poll" if endpoint is None else "push",
                endpoint,
                list(events),
                full,
                scope_group,
                token.id if token else None,
                start[0],
                start[1],
            )
        except asyncpg.UniqueViolationError:
            raise StreamError(f"tenant {tenant} already has a stream named {name!r}") from None
        if scope_group is not None and not from_start:
            await _seed_members(conn, stream_id, tenant_id, scope_group)
    out: dict[str, Any] = {"id": str(stream_id), "tenant": tenant, "name": name}
    if token is not None:
        out["token"] = token.token
    return out


async def _seed_members(
    conn: Conn, stream_id: uuid.UUID, tenant_id: uuid.UUID, group_id: uuid.UUID
) -> None:
    """A scoped stream that starts now starts with the group's members of now."""
    await conn.execute("DELETE FROM feed_members WHERE stream_id = $1", stream_id)
    await conn.execute(
        "INSERT INTO feed_members (stream_id, member_id)"
        " SELECT $1::uuid, member_id FROM scim_group_members"
        " WHERE tenant_id = $2 AND group_id = $3::uuid UNION SELECT $1::uuid, $3::uuid",
        stream_id,
        tenant_id,
        group_id,
    )


async def find(conn: Conn, tenant: str, name_or_id: str) -> asyncpg.Record:
    try:
        key: uuid.UUID | None = uuid.UUID(name_or_id)
    except ValueError:
        key = None
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM feed_streams s JOIN tenants t ON t.id = s.tenant_id"
        " WHERE t.name = $1 AND (s.name = $2 OR s.id = $3)",
        tenant,
        name_or_id,
        key,
    )
    if row is None:
        raise StreamError(f"tenant {tenant} has no stream {name_or_id!r}")
    return row


async def list_streams(conn: Conn, tenant: str) -> list[asyncpg.Record]:
    if await conn.fetchval("SELECT id FROM tenants WHERE name = $1", tenant) is None:
        raise UnknownTenant(tenant)
    return list(
        await conn.fetch(
            f"SELECT {COLUMNS} FROM feed_streams s JOIN tenants t ON t.id = s.tenant_id"
            " WHERE t.name = $1 ORDER BY s.created_at, s.name",
            tenant,
        )
    )


async def show(conn: Conn, tenant: str, name: str) -> dict[str, Any]:
    """The stream, with its progress: events of the tenant behind its checkpoint."""
    row = await find(conn, tenant, name)
    record = describe(row)
    record["behind"] = await conn.fetchval(
        "SELECT count(*) FROM stored_events WHERE tenant_id = $1"
        " AND (transaction_id, notification_id) > ($2::bigint, $3::bigint)",
        row["tenant_id"],
        row["checkpoint_transaction"],
        row["checkpoint_position"],
    )
    return record


def describe(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dict(row).items():
        if key in ("tenant_id", "token_id"):
            continue
        if isinstance(value, datetime):
            out[key] = value.isoformat()
        elif isinstance(value, uuid.UUID):
            out[key] = str(value)
        else:
            out[key] = value
    out["state"] = "paused" if row["paused_at"] else "failing" if row["failing_since"] else "active"
    return out


async def set_paused(conn: Conn, tenant: str, name: str, paused: bool) -> None:
    row = await find(conn, tenant, name)
    await conn.execute(
        "UPDATE feed_streams SET paused_at = CASE WHEN $2 THEN coalesce(paused_at, now()) END"
        " WHERE id = $1",
        row["id"],
        paused,
    )


async def delete(conn: Conn, tenant: str, name: str) -> None:
    row = await find(conn, tenant, name)
    async with conn.transaction():
        await conn.execute("DELETE FROM feed_streams WHERE id = $1", row["id"])
        # No foreign key cascades to them (migration 0028): the stream's row, deleted first,
        # waits for a producer's step that holds it, so what that step stored goes too.
        await conn.execute("DELETE FROM feed_sets WHERE stream_id = $1", row["id"])
        if row["token_id"] is not None:
            await conn.execute(
                "UPDATE tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
                row["token_id"],
            )


async def reset(conn: Conn, tenant: str, name: str, start: str) -> None:
    """Move the checkpoint: START (the log's beginning), NOW (its end) or a timestamp (the first
    event recorded at or after it). Pending SETs are dropped: the stream is rebuilt from there,
    in a new epoch (new `jti`s: a replay, not a redelivery)."""
    row = await find(conn, tenant, name)
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM feed_streams WHERE id = $1 FOR UPDATE", row["id"])
        if start.upper() == "START":
            position = Position(0, 0)
        elif start.upper() == "NOW":
            position = await _head(conn)
        else:
            try:
                moment = datetime.fromisoformat(start)
            except ValueError:
                raise StreamError("--from must be START, NOW or an ISO 8601 timestamp") from None
            if moment.tzinfo is None:
                raise StreamError("--from: give the timestamp's offset (e.g. Z or +00:00)")
            first = await conn.fetchrow(
                "SELECT transaction_id, notification_id FROM stored_events"
                " WHERE recorded_at >= $1 ORDER BY transaction_id, notification_id LIMIT 1",
                moment,
            )
            if first is None:
                position = await _head(conn)
            else:  # just before the first event at or after the moment
                position = Position(first[0], first[1] - 1)
        await conn.execute("DELETE FROM feed_sets WHERE stream_id = $1", row["id"])
        await conn.execute(
            "UPDATE feed_streams SET checkpoint_transaction = $2, checkpoint_position = $3,"
            " failing_since = NULL, last_error = NULL, epoch = epoch + 1 WHERE id = $1",
            row["id"],
            position[0],
            position[1],
        )
        if row["scope_group"] is not None:
            if position == Position(0, 0):
                await conn.execute("DELETE FROM feed_members WHERE stream_id = $1", row["id"])
            else:
                await _seed_members(conn, row["id"], row["tenant_id"], row["scope_group"])
