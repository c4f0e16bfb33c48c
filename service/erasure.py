"""Erasure of a data subject by crypto-shredding (issue 17), its receipts and their check.

`erase` destroys the subject's data key (infra.keys), deletes its rows from the SCIM views and
the audit projection's copy of it, and appends `SubjectErased` (domain.erasure), all in one
transaction; the audit projection, meeting that event, makes the subject's provisioning-log
entries read `[erased]` (projections.audit). The events stay, unreadable. A receipt row
(`erasures`) records who asked, when, why and the counts; `verify` checks it still holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
import structlog

from domain.erasure import Erasure
from infra import sealing
from infra.database import Database
from infra.eventstore import Conn
from infra.keys import SubjectErased, uuids
from infra.sealing import ERASED, PLACEHOLDER, SEALED, is_personal_topic
from service.feeds.erasure import scrub as scrub_pending_sets

_log = structlog.get_logger()

TYPES = ("User", "Group")
MAX_REASON = 1000


class ErasureError(Exception):
    """A refused erasure: `status` and `scim_type` for the API, the message for everyone."""

    def __init__(self, status: int, message: str, scim_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.scim_type = scim_type


@dataclass(frozen=True)
class Receipt:
    id: UUID
    tenant_id: UUID
    subject_id: UUID
    subject_type: str
    requested_by: str
    reason: str | None
    erased_at: datetime
    events: int
    rows_deleted: int
    audit_entries: int

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "tenantId": str(self.tenant_id),
            "subjectId": str(self.subject_id),
            "subjectType": self.subject_type,
            "requestedBy": self.requested_by,
            "reason": self.reason,
            "erasedAt": self.erased_at.isoformat(),
            "events": self.events,
            "rowsDeleted": self.rows_deleted,
            "auditEntries": self.audit_entries,
            "verify": f"scimledger erase verify {self.id}",
        }


_RECEIPT_COLUMNS = (
    "id, tenant_id, subject_id, subject_type, requested_by, reason, erased_at, events,"
    " rows_deleted, audit_entries"
)


async def _subject_type(conn: Conn, tenant_id: UUID, subject_id: UUID) -> str | None:
    topic = await conn.fetchval(
        "SELECT topic FROM stored_events WHERE originator_id = $1 AND tenant_id = $2"
        " ORDER BY originator_version LIMIT 1",
        subject_id,
        tenant_id,
    )
    if topic is None or not is_personal_topic(topic):
        return None
    return "User" if topic.startswith("domain.user:") else "Group"


async def _exists_in_scim(conn: Conn, tenant_id: UUID, subject_id: UUID, kind: str) -> bool:
    table = "scim_users" if kind == "User" else "scim_groups"
    found = await conn.fetchval(
        f"SELECT 1 FROM {table} WHERE tenant_id = $1 AND id = $2", tenant_id, subject_id
    )
    return found is not None


async def erase(
    db: Database,
    tenant_id: UUID,
    subject_id: UUID,
    subject_type: str,
    requested_by: str,
    reason: str | None = None,
    *,
    force: bool = False,
) -> Receipt:
    """Erase one subject of one tenant; raises ErasureError (nothing done) when refused."""
    if subject_type not in TYPES:
        raise ErasureError(400, f"subject type must be one of {', '.join(TYPES)}", "invalidValue")
    if reason is not None and len(reason) > MAX_REASON:
        raise ErasureError(400, f"reason is longer than {MAX_REASON} characters", "invalidValue")
    async with db.pool.acquire() as conn:
        kind = await _subject_type(conn, tenant_id, subject_id)
        if kind is None:
            raise ErasureError(404, f"no {subject_type} {subject_id} in this tenant")
        if kind != subject_type:
            raise ErasureError(
                400, f"{subject_id} is a {kind}, not a {subject_type}", "invalidValue"
            )
        if await _exists_in_scim(conn, tenant_id, subject_id, kind):
            if not force:
                raise ErasureError(
                    409,
                    f"{kind} {subject_id} still exists: delete it first (DELETE /scim/v2/"
                    f"{kind}s/{subject_id}), or erase with --force to deprovision it",
                    "mutability",
                )
            await _deprovision(db, tenant_id, subject_id, kind)
        # Events stored before encryption are sealed first, or destroying the key hides nothing.
        await seal_stream(db, conn, tenant_id, subject_id)
        async with conn.transaction():
            key = await conn.fetchrow(
                "SELECT wrapped FROM subject_keys WHERE subject_id = $1 AND tenant_id = $2"
                " FOR UPDATE",
                subject_id,
                tenant_id,
            )
            if key is None or key["wrapped"] is None:
                raise ErasureError(
                    409, f"{kind} {subject_id} has already been erased", "mutability"
                )
            await conn.execute(
                "UPDATE subject_keys SET wrapped = NULL, erased_at = now() WHERE subject_id = $1",
                subject_id,
            )
            events = int(
                await conn.fetchval(
                    "SELECT count(*) FROM stored_events WHERE originator_id = $1", subject_id
                )
            )
            rows = 0
            for sql in (
                "DELETE FROM scim_users WHERE tenant_id = $1 AND id = $2",
                "DELETE FROM scim_groups WHERE tenant_id = $1 AND id = $2",
                "DELETE FROM scim_group_members WHERE tenant_id = $1"
                " AND (group_id = $2 OR member_id = $2)",
                "DELETE FROM audit_resources WHERE tenant_id = $1 AND id = $2",
            ):
                rows += _count(await conn.execute(sql, tenant_id, subject_id))
            entries = int(
                await conn.fetchval(
                    "SELECT count(*) FROM audit_entries WHERE tenant_id = $1 AND target_id = $2",
                    tenant_id,
                    subject_id,
                )
            )
            erasure = Erasure(
                id=uuid.uuid4(),
                tenant_id=tenant_id,
                subject_id=subject_id,
                subject_type=kind,
                requested_by=requested_by,
                reason=reason,
                events=events,
                rows_deleted=rows,
                audit_entries=entries,
            )
            recorded = await db.store.append(conn, tenant_id, erasure.collect_events())
            # Pending SETs carrying the subject's values become notices (issue 18).
            await scrub_pending_sets(conn, tenant_id, subject_id)
            row = await conn.fetchrow(
                f"INSERT INTO erasures ({_RECEIPT_COLUMNS})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                f" RETURNING {_RECEIPT_COLUMNS}",
                erasure.id,
                tenant_id,
                subject_id,
                kind,
                requested_by,
                reason,
                recorded[0].recorded_at,
                events,
                rows,
                entries,
            )
    db.store.keys.erased(subject_id)
    db.store.notify()
    _log.info(
        "subject erased",
        erasure=str(erasure.id),
        tenant=str(tenant_id),
        subject=str(subject_id),
        type=kind,
        events=events,
        rows=rows,
    )
    assert row is not None
    return Receipt(**dict(row))


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1]) if status and status[-1].isdigit() else 0


async def _deprovision(db: Database, tenant_id: UUID, subject_id: UUID, kind: str) -> None:
    from service.commands import DeleteGroup, DeleteUser
    from service.handlers import Caller, Handlers
    from service.scim.documents import ScimDocuments

    handlers = Handlers(db, ScimDocuments())
    caller = Caller(tenant_id=tenant_id, request_id=f"erasure-{uuid.uuid4()}")
    if kind == "User":
        await handlers.delete_user(caller, DeleteUser(subject_id))
    else:
        await handlers.delete_group(caller, DeleteGroup(subject_id))


async def seal_stream(db: Database, conn: Conn, tenant_id: UUID, subject_id: UUID) -> int:
    """Seal, in place, the events of one subject stored before encryption; their number.

    Positions (notification and transaction ids) and everything else of the rows are kept;
    only `state` changes. Idempotent: sealed events, and events without personal values
    (a deprovisioning), are left as they are.
    """
    rows = await conn.fetch(
        "SELECT originator_version, topic, state FROM stored_events"
        " WHERE originator_id = $1 AND tenant_id = $2 ORDER BY originator_version",
        subject_id,
        tenant_id,
    )
    keys = db.store.keys
    clear = []
    for r in rows:
        topic: str = r["topic"]
        if not is_personal_topic(topic) or SEALED.encode() in r["state"]:
            continue
        if sealing.split(keys, orjson.loads(r["state"]), topic.split(":", 1)[0]):
            clear.append(r)
    if not clear:
        return 0
    await keys.load(conn, [subject_id])
    if not keys.known(subject_id):
        await keys.create(conn, tenant_id, subject_id)
    if keys.cipher(subject_id) is None:
        raise SubjectErased(subject_id)
    await _member_keys(conn, keys, tenant_id, clear)
    from eventsourcing.persistence import StoredEvent

    sealed: list[tuple[int, bytes]] = []
    for r in clear:
        stored = StoredEvent(subject_id, r["originator_version"], r["topic"], r["state"])
        event = db.store.mapper.to_domain_event(stored)
        sealed.append((r["originator_version"], db.store.mapper.to_stored_event(event).state))
    await conn.execute(
        "UPDATE stored_events s SET state = u.state"
        " FROM unnest($2::bigint[], $3::bytea[]) AS u (version, state)"
        " WHERE s.originator_id = $1 AND s.originator_version = u.version",
        subject_id,
        [v for v, _ in sealed],
        [s for _, s in sealed],
    )
    return len(sealed)


async def _member_keys(conn: Conn, keys: Any, tenant_id: UUID, rows: list[Any]) -> None:
    """The keys a group's clear membership changes are sealed with: each member's display goes
    under its member's key (infra.sealing.seal_displays); a member from before encryption gets
    its key now, as its own stream would."""
    members: set[UUID] = set()
    for r in rows:
        displays = orjson.loads(r["state"]).get(sealing.DISPLAYS)
        if type(displays) is dict:
            members.update(uuids(displays))
    if not members:
        return
    await keys.load(conn, members)
    for member in members:
        if not keys.known(member):
            await keys.create(conn, tenant_id, member)


_PERSONAL_STREAMS = (
    "SELECT DISTINCT originator_id, tenant_id FROM stored_events"
    " WHERE (topic LIKE 'domain.user:%' OR topic LIKE 'domain.group:%')"
)


async def migrate_all(
    db: Database, progress: Callable[[int, int], None] | None = None, batch: int = 200
) -> int:
    """`scimledger erase migrate`: seal every clear event of the store, stream by stream.

    Resumable: each stream is sealed in a transaction of its own and sealed events are left
    as they are, so an interrupted run just runs again. Returns the number of events sealed.
    """
    done = sealed = 0
    cursor = UUID(int=0)
    async with db.pool.acquire() as conn:
        total = int(await conn.fetchval(f"SELECT count(*) FROM ({_PERSONAL_STREAMS}) s"))
        while True:
            streams = await conn.fetch(
                f"{_PERSONAL_STREAMS} AND originator_id > $1 ORDER BY originator_id LIMIT $2",
                cursor,
                batch,
            )
            for s in streams:
                async with conn.transaction():
                    # Locked against a concurrent erasure or migration of the same stream.
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended($1::text, 17))",
                        str(s["originator_id"]),
                    )
                    try:
                        sealed += await seal_stream(db, conn, s["tenant_id"], s["originator_id"])
                    except SubjectErased:
                        pass  # erased: its clear events were sealed before its key went
                done += 1
                if progress:
                    progress(done, max(total, done))
            if len(streams) < batch:
                return sealed
            cursor = streams[-1]["originator_id"]


async def receipts(conn: Conn, tenant_id: UUID, limit: int = 1000) -> list[Receipt]:
    rows = await conn.fetch(
        f"SELECT {_RECEIPT_COLUMNS} FROM erasures WHERE tenant_id = $1"
        " ORDER BY erased_at DESC LIMIT $2",
        tenant_id,
        limit,
    )
    return [Receipt(**dict(r)) for r in rows]


async def receipt(conn: Conn, erasure_id: UUID, tenant_id: UUID | None = None) -> Receipt | None:
    row = await conn.fetchrow(
        f"SELECT {_RECEIPT_COLUMNS} FROM erasures WHERE id = $1"
        " AND ($2::uuid IS NULL OR tenant_id = $2)",
        erasure_id,
        tenant_id,
    )
    return Receipt(**dict(row)) if row else None


async def verify(db: Database, erasure_id: UUID) -> tuple[Receipt | None, list[str]]:
    """Check a receipt: the key is destroyed, no event of the subject decrypts, no view row
    and no audit entry holds its values. Returns the receipt and the problems found."""
    problems: list[str] = []
    async with db.pool.acquire() as conn:
        found = await receipt(conn, erasure_id)
        if found is None:
            return None, [f"no erasure {erasure_id}"]
        sid, tid = found.subject_id, found.tenant_id
        key = await conn.fetchrow("SELECT wrapped FROM subject_keys WHERE subject_id = $1", sid)
        if key is None or key["wrapped"] is not None:
            problems.append("the subject's data key still exists")
        # Decode every event with a fresh key ring: none may yield a value.
        records = await db.store.read_stream(conn, sid)
        for r in records:
            state = orjson.loads(r.state)
            if is_personal_topic(r.topic) and SEALED not in state:
                if sealing.split(db.store.keys, dict(state), r.topic.split(":", 1)[0]):
                    problems.append(f"event {r.originator_version} is stored in clear")
                continue
            state.pop(SEALED, None)
            decoded = vars(db.store.to_domain(r))
            for field, value in state.items():
                if _holds_value(decoded.get(field), value):
                    problems.append(f"event {r.originator_version} decrypts ({field})")
        for table, column in (
            ("scim_users", "id"),
            ("scim_groups", "id"),
            ("scim_group_members", "member_id"),
            ("scim_group_members", "group_id"),
            ("audit_resources", "id"),
        ):
            n = await conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE tenant_id = $1 AND {column} = $2", tid, sid
            )
            if n:
                problems.append(f"{table} holds {n} row(s) of the subject")
        n = await conn.fetchval(
            "SELECT count(*) FROM audit_entries WHERE tenant_id = $1 AND target_id = $2"
            " AND (coalesce(target_name, $3) <> $3 OR source_id IS NOT NULL"
            " OR (modified_properties <> '[]'::jsonb AND action <> 'erase'))",
            tid,
            sid,
            ERASED,
        )
        if n:
            problems.append(f"{n} provisioning-log entr(ies) still hold the subject's values")
    return found, problems


def _holds_value(decoded: Any, stored: Any) -> bool:
    """Whether a decoded field holds a value where the stored one had a sealed placeholder."""
    if type(stored) is dict and type(decoded) is dict:
        return any(_holds_value(decoded.get(k), v) for k, v in stored.items())
    if type(stored) is list and type(decoded) is list:
        return any(_holds_value(d, s) for d, s in zip(decoded, stored, strict=False))
    if stored == PLACEHOLDER:
        return not (isinstance(decoded, str) and decoded.startswith(ERASED[:-1]))
    return False
