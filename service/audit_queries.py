"""Reading the provisioning log: filters, keyset pages, exports. Shared by the API and the CLI."""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from infra import audit_sealing
from infra.eventstore import Conn
from projections import state
from projections.audit import ENTRY_COLUMNS
from service.boundary import in_utc, is_bigint, text_problem

ACTIONS = ("create", "update", "delete", "disable", "erase", "other")
STATUSES = ("success", "failure", "skipped")
MAX_LIMIT = 500


class BadQuery(ValueError):
    """A filter value that cannot be used; the API answers 400 with the message."""


@dataclass(frozen=True)
class AuditFilter:
    since: datetime | None = None
    until: datetime | None = None
    action: str | None = None
    status: str | None = None
    target_id: UUID | None = None
    identity: str | None = None  # target name contains (case-insensitive)
    change_id: str | None = None
    client_request_id: str | None = None
    error_code: str | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> AuditFilter:
        def when(name: str) -> datetime | None:
            raw = params.get(name)
            if not raw:
                return None
            try:
                moment = datetime.fromisoformat(raw.replace("Z", "+00:00").replace(" ", "+"))
            except ValueError:
                raise BadQuery(f"{name} must be an ISO 8601 date-time") from None
            if moment.tzinfo is None:
                raise BadQuery(f"{name} must carry a time zone (e.g. Z)")
            if in_utc(moment) is None:
                raise BadQuery(f"{name} is out of range (years 1 to 9999 in UTC)")
            return moment

        def text(name: str) -> str | None:
            raw = params.get(name) or None
            problem = text_problem(raw) if raw else None
            if problem:
                raise BadQuery(f"{name} {problem}")
            return raw

        action, status = params.get("action") or None, params.get("status") or None
        if action and action not in ACTIONS:
            raise BadQuery(f"action must be one of {', '.join(ACTIONS)}")
        if status and status not in STATUSES:
            raise BadQuery(f"status must be one of {', '.join(STATUSES)}")
        target = params.get("target") or None
        try:
            target_id = UUID(target) if target else None
        except ValueError:
            raise BadQuery("target must be a resource id") from None
        return cls(
            since=when("from"),
            until=when("to"),
            action=action,
            status=status,
            target_id=target_id,
            identity=text("identity"),
            change_id=text("changeId"),
            client_request_id=text("clientRequestId"),
            error_code=text("errorCode"),
        )

    def where(self, tenant_id: UUID) -> tuple[str, list[Any]]:
        clauses, args = ["tenant_id = $1"], [tenant_id]

        def add(sql: str, value: Any) -> None:
            args.append(value)
            clauses.append(sql.replace("?", f"${len(args)}"))

        if self.since:
            add("activity_at >= ?", self.since)
        if self.until:
            add("activity_at < ?", self.until)
        if self.action:
            add("action = ?", self.action)
        if self.status:
            add("status = ?", self.status)
        if self.target_id:
            add("target_id = ?", self.target_id)
        if self.identity:
            escaped = self.identity.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            # The log's names are sealed (infra.audit_sealing): a name is looked up where it is
            # in clear, the SCIM views (current names of existing users and groups); a target
            # that is not a user or a group (a schema) keeps its name in clear.
            add(
                "(target_name ILIKE ? OR target_id IN (SELECT id FROM scim_users"
                " WHERE tenant_id = $1 AND user_name ILIKE ? UNION ALL SELECT id FROM scim_groups"
                " WHERE tenant_id = $1 AND display_name ILIKE ?))",
                f"%{escaped}%",
            )
        if self.change_id:
            add("change_id = ?", self.change_id)
        if self.client_request_id:
            add("client_request_id = ?", self.client_request_id)
        if self.error_code:
            add("error_code = ?", self.error_code)
        return " AND ".join(clauses), args


def encode_next(row: Any) -> str:
    """A page token: the id of the page's last entry. Never its transaction id or position,
    global counters whose gaps would tell other tenants' volume (issue 14); only an entry
    without an id (none is made today) falls back to (activity_at, transaction_id,
    entry_position)."""
    if row["id"] is not None:
        raw = orjson.dumps(str(row["id"]))
    else:
        raw = orjson.dumps(
            [row["activity_at"].isoformat(), row["transaction_id"], row["entry_position"]]
        )
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_next(token: str) -> UUID | tuple[datetime, int, int | None]:
    """The entry id (or (activity_at, transaction_id, entry_position)) a page token of
    encode_next holds; a forged one is refused here, before its values reach a uuid, a bigint
    or a timestamptz. A token made before entries were per request (issue 16) holds no
    position: None."""
    try:
        held = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if isinstance(held, str):
            return UUID(held)
        at, txid, *rest = held
        if len(rest) > 1:
            raise ValueError("too many values")
        position = rest[0] if rest else None
        moment = datetime.fromisoformat(at)
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise BadQuery("next is not a page token of this API") from None
    if moment.tzinfo is None or in_utc(moment) is None or not is_bigint(txid):
        raise BadQuery("next is not a page token of this API")
    if position is not None and not is_bigint(position):
        raise BadQuery("next is not a page token of this API")
    return moment, txid, position


async def resolve_next(
    conn: Conn | asyncpg.Pool, tenant_id: UUID, token: str
) -> tuple[datetime, int]:
    """Where the page after `token` starts: (activity_at, entry_position) of the tenant's
    entry it names, read here so that neither leaves the service."""
    held = decode_next(token)
    if isinstance(held, UUID):
        row = await conn.fetchrow(
            "SELECT activity_at, entry_position FROM audit_entries"
            " WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            held,
        )
    else:
        moment, txid, position = held
        if position is not None:
            return moment, position
        # A token of the entry of a transaction (one request each, when it was made).
        row = await conn.fetchrow(
            "SELECT activity_at, entry_position FROM audit_entries WHERE tenant_id = $1"
            " AND activity_at = $2 AND transaction_id = $3 ORDER BY entry_position LIMIT 1",
            tenant_id,
            moment,
            txid,
        )
    if row is None:
        raise BadQuery("next is not a page token of this API")
    return row["activity_at"], row["entry_position"]


# The streams whose events name a SCIM resource, by the class part of the event's topic.
_RESOURCE_PATHS = {"User": "/Users/", "Group": "/Groups/"}


def event_json(stream: UUID, version: int, topic: str) -> dict[str, Any]:
    """One stored event of an entry, named by what belongs to the tenant alone: its stream
    (for a user's or group's, the resource's path), its version there and its type.

    Never its global position: the gaps between an entry's positions and the next entry's
    would count the events of every other tenant stored meanwhile (issue 14)."""
    prefix, name = _topic(topic)
    text = str(stream)
    return {
        "resource": prefix + text if prefix else None,
        "stream": text,
        "version": version,
        "type": name,
    }


@functools.lru_cache(maxsize=256)
def _topic(topic: str) -> tuple[str | None, str]:
    """(the resource path prefix of its stream, if a SCIM resource's; the event's type) of an
    event topic: a handful of topics, parsed once each rather than once per event read."""
    qualname = topic.partition(":")[2]
    kind, _, name = qualname.rpartition(".")
    return _RESOURCE_PATHS.get(kind), name or qualname


async def stored_events(
    conn: Conn | asyncpg.Pool, tenant_id: UUID, rows: Sequence[Any]
) -> dict[int, dict[str, Any]]:
    """The events of the entries in `rows` (their kept positions), as `event_json`, by
    position: one indexed query for a whole page; another tenant's event is never read."""
    positions = [p for row in rows for p in row["positions"]]
    if not positions:
        return {}
    found = await conn.fetch(
        "SELECT notification_id, originator_id, originator_version, topic FROM stored_events"
        " WHERE notification_id = any($1::bigint[]) AND tenant_id = $2",
        positions,
        tenant_id,
    )
    return {
        r["notification_id"]: event_json(r["originator_id"], r["originator_version"], r["topic"])
        for r in found
    }


def entry_json(row: Any, events: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    """An entry shaped like Microsoft Graph's provisioningObjectSummary, plus what only we know.

    `events` (from `stored_events`) names the events the request stored; the positions the
    projection keeps to find them are never returned."""
    error = None
    if row["status"] == "failure":
        error = {"errorCode": row["error_code"], "reason": row["error_reason"]}
    return {
        "id": str(row["id"]) if row["id"] else str(row["transaction_id"]),
        "activityDateTime": row["activity_at"].isoformat().replace("+00:00", "Z"),
        "tenantId": str(row["tenant_id"]),
        "changeId": row["change_id"],
        "clientRequestId": row["client_request_id"],
        "provisioningAction": row["action"],
        "provisioningStatusInfo": {"status": row["status"], "errorInformation": error},
        "modifiedProperties": row["modified_properties"],
        "targetIdentity": {
            "id": str(row["target_id"]) if row["target_id"] else None,
            "displayName": row["target_name"],
            "identityType": row["target_type"],
        },
        "sourceIdentity": {"id": row["source_id"], "identityType": row["target_type"]},
        "initiatedBy": {"displayName": row["initiated_by"], "initiatorType": "application"},
        "durationInMilliseconds": row["duration_ms"],
        "request": {"method": row["method"], "path": row["path"], "status": row["http_status"]},
        "events": [events[p] for p in row["positions"] if p in events],
    }


async def page(
    conn: Conn | asyncpg.Pool,
    tenant_id: UUID,
    where: AuditFilter,
    limit: int = 50,
    next_token: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first, keyset-paginated (never OFFSET)."""
    limit = max(1, min(limit, MAX_LIMIT))
    after = await resolve_next(conn, tenant_id, next_token) if next_token else None
    rows = await select_rows(conn, tenant_id, where, limit + 1, after)
    more = len(rows) > limit
    rows = rows[:limit]
    events = await stored_events(conn, tenant_id, rows)
    opened = await audit_sealing.open_entries(conn, rows)
    return [entry_json(r, events) for r in opened], encode_next(rows[-1]) if more and rows else None


async def select_rows(
    conn: Conn | asyncpg.Pool,
    tenant_id: UUID,
    where: AuditFilter,
    limit: int,
    after: tuple[datetime, int] | None,
    selected: tuple[str, list[Any]] | None = None,
) -> list[asyncpg.Record]:
    """Up to `limit` selected rows, newest first, older than `after` (activity_at,
    entry_position). `selected`: the WHERE clause and its arguments, if not `where`'s own."""
    sql, args = selected or where.where(tenant_id)
    args = list(args)
    if after is not None:
        args += list(after)
        sql += f" AND (activity_at, entry_position) < (${len(args) - 1}, ${len(args)})"
    args.append(limit)
    statement = (
        f"SELECT {ENTRY_COLUMNS} FROM audit_entries WHERE {sql}"
        f" ORDER BY activity_at DESC, entry_position DESC LIMIT ${len(args)}"
    )
    return await fetch_selected(conn, where, statement, args)


async def fetch_selected(
    conn: Conn | asyncpg.Pool, where: AuditFilter, statement: str, args: list[Any]
) -> list[asyncpg.Record]:
    """The rows of `statement`, a query over the entries `where` selects."""
    if where.identity:
        # "contains" must be planned for its value: a generic plan always takes the trigram
        # index, which cannot narrow a one- or two-letter term and rechecks every row.
        async with _connection(conn) as c, c.transaction(readonly=True):
            await c.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            return await c.fetch(statement, *args)
    return await conn.fetch(statement, *args)


@asynccontextmanager
async def _connection(source: Conn | asyncpg.Pool) -> AsyncIterator[Conn]:
    if isinstance(source, asyncpg.Pool):
        async with source.acquire() as conn:
            yield conn
    else:
        yield source


async def one(conn: Conn | asyncpg.Pool, tenant_id: UUID, entry_id: str) -> dict[str, Any] | None:
    try:
        key = UUID(entry_id)
    except ValueError:
        return None
    row = await conn.fetchrow(
        f"SELECT {ENTRY_COLUMNS} FROM audit_entries WHERE tenant_id = $1 AND id = $2",
        tenant_id,
        key,
    )
    if row is None:
        return None
    [opened] = await audit_sealing.open_entries(conn, [row])
    return entry_json(opened, await stored_events(conn, tenant_id, [row]))


async def history(
    conn: Conn | asyncpg.Pool,
    tenant_id: UUID,
    resource_id: UUID,
    limit: int = 50,
    next_token: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """The entries about one resource, oldest first, keyset-paginated like `page`."""
    limit = max(1, min(limit, MAX_LIMIT))
    args: list[Any] = [tenant_id, resource_id]
    after = ""
    if next_token:
        at, position = await resolve_next(conn, tenant_id, next_token)
        args += [at, position]
        after = " AND (activity_at, entry_position) > ($3, $4)"
    args.append(limit + 1)
    rows = await conn.fetch(
        f"SELECT {ENTRY_COLUMNS} FROM audit_entries WHERE tenant_id = $1 AND target_id = $2"
        f"{after} ORDER BY activity_at, entry_position LIMIT ${len(args)}",
        *args,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    events = await stored_events(conn, tenant_id, rows)
    opened = await audit_sealing.open_entries(conn, rows)
    return [entry_json(r, events) for r in opened], encode_next(rows[-1]) if more and rows else None


async def member_types(
    conn: Conn | asyncpg.Pool, tenant_id: UUID, ids: list[str]
) -> dict[str, str]:
    """The ids among `ids` that are groups of `tenant_id` (the others are users)."""
    rows = await conn.fetch(
        "SELECT id::text FROM audit_resources"
        " WHERE tenant_id = $1 AND type = 'Group' AND id = any($2::uuid[])",
        tenant_id,
        ids,
    )
    return {r["id"]: "Group" for r in rows}


# The lag is counted over at most this many of the tenant's newest events; past it, "at least".
LAG_COUNT_CAP = 1000


async def lag(conn: Conn | asyncpg.Pool, tenant_id: UUID) -> dict[str, Any]:
    """How far the (asynchronous) audit log trails this tenant's own events.

    Counted over the tenant's newest LAG_COUNT_CAP events only (its own index, newest
    first), so a request reads at most that many rows however far behind the log is, and
    neither the figure nor its cost tells anything about other tenants: no global position,
    no time of the projection's last step. `eventsBehindCapped`: the count reached the cap.
    """
    behind = await state.tenant_lag(conn, "audit", tenant_id, LAG_COUNT_CAP)
    if behind is None:
        return {"eventsBehind": None, "eventsBehindCapped": False}
    return {"eventsBehind": behind, "eventsBehindCapped": behind >= LAG_COUNT_CAP}
