"""The provisioning log (`audit_entries`): one entry per SCIM write request.

An asynchronous projection. Every request that writes appends a `RequestRecorded` event (its
outcome, method, path, token, duration) and, when it changed something, its domain events,
all in one transaction, each event stamped with the request's id; a batch always holds whole
transactions (see EventStore.read_all). A transaction may hold several requests (POST /Users
commits concurrent requests together: service/group_commit.py): the entry is a request's, the
events of one transaction with one request id, keyed by the position of its first event
(`entry_position`, the same in a rebuild). The entry for a request combines them: what was
asked, what happened, and for each attribute the value before and after. Values before come
from `audit_resources`, the projection's own copy of each resource's state, folded with the
same aggregate code as the views.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import orjson

from domain.erasure import Erasure
from domain.errors import bounded
from domain.group import Group
from domain.request import ProvisioningRequest
from domain.schema import EXTENSION_SEPARATOR, is_extension_urn
from domain.user import User
from infra import audit_sealing, detail_sealing, group_labels
from infra.eventstore import Conn
from infra.keys import KeyRing, is_erased
from infra.sealing import ERASED, PLACEHOLDER
from projections import audit_resources
from projections.audit_resources import RESOURCES, Held, json_rows, state_of

NAME = "audit"
# 2: list and object values in modifiedProperties are UTF-8 JSON (orjson), not \u-escaped.
# 3: the error reason is bounded (domain.errors.bounded), also for requests recorded before it
#    was; and the client's X-Request-Id (`clientRequestId`) has a column of its own.
# 4: personal values sealed under the subject's data key (infra.audit_sealing).
# 5: a group named in another subject's entry by its id (infra.group_labels); a failed
#    request's detail as its record sealed it (infra.detail_sealing).
VERSION = 5
ENTRIES = "audit_entries"
TABLES = (ENTRIES, RESOURCES)
LIVE: Mapping[str, str] = {ENTRIES: ENTRIES, RESOURCES: RESOURCES}

ENTRY_COLUMNS = (
    "entry_position, transaction_id, id, tenant_id, activity_at, change_id, action, status,"
    " error_code, error_reason, target_type, target_id, target_name, source_id, initiated_by,"
    " method, path, http_status, duration_ms, positions, modified_properties,"
    " client_request_id, sealed"
)
_ENTRY_FIELDS = tuple(column.strip() for column in ENTRY_COLUMNS.split(","))
_ENTRY_TYPES = (
    "entry_position bigint, transaction_id bigint, id uuid, tenant_id uuid,"
    " activity_at timestamptz, change_id text, action text, status text, error_code text,"
    " error_reason text, target_type text, target_id uuid, target_name text, source_id text,"
    " initiated_by text, method text, path text, http_status int, duration_ms float8,"
    " positions bigint[], modified_properties jsonb, client_request_id text, sealed text"
)

# Entra's provisioning-log error codes, from the SCIM error a request got.
ERROR_CODES = {
    ("409", "uniqueness"): "EntryConflict",
    ("404", None): "InvalidAnchor",
    ("412", None): "EntryConflict",
    ("401", None): "Unauthorized",
    ("403", None): "Unauthorized",
    ("413", None): "InvalidInput",
    ("429", None): "TooManyRequests",
    ("500", None): "InternalServerError",
    ("503", None): "ServiceUnavailable",
}


def error_code(error: Mapping[str, Any]) -> str:
    status, scim_type = str(error.get("status")), error.get("scimType")
    code = ERROR_CODES.get((status, scim_type)) or ERROR_CODES.get((status, None))
    if code:
        return code
    if status == "400":
        detail = str(error.get("detail", ""))
        required = error.get("required") or "required" in detail  # (sealed: its flag)
        return "MandatoryFieldsMissing" if required else "InvalidInput"
    return "Other"


def _flat(state: Mapping[str, Any] | None) -> Mapping[str, str]:
    """Attribute paths and their values as text, the way modifiedProperties shows them.
    (Hot: an entry flattens its resource after every event; a replay, for each of the store.)"""
    out: dict[str, str] = {}
    for key, value in (state or {}).items():
        if isinstance(value, dict):
            prefix = _prefixes.get(key)
            if prefix is None:
                prefix = _prefix(key)
            for sub, sub_value in value.items():
                out[prefix + sub] = sub_value if type(sub_value) is str else _json(sub_value)
        else:
            out[key] = value if type(value) is str else _json(value)
    return out


_prefixes: dict[str, str] = {}  # an attribute's name -> its sub-attributes' prefix


def _prefix(key: str) -> str:
    # An extension's attributes go by their full names, `urn:…:2.0:User:Attribute`.
    prefix = key + (EXTENSION_SEPARATOR if is_extension_urn(key) else ".")
    if len(_prefixes) < 1024:  # the names are declared ones, but a client's may be anything
        _prefixes[key] = prefix
    return prefix


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _changes(old: Mapping[str, str], new: Mapping[str, str]) -> list[dict[str, Any]]:
    """modifiedProperties: the attributes (flattened by `_flat`) whose text changed."""
    if old == new:
        return []
    return [
        {"displayName": key, "oldValue": old.get(key), "newValue": new.get(key)}
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


class _Entry:
    def __init__(self, record: Any) -> None:
        self.transaction_id = record.transaction_id
        self.entry_position = record.notification_id  # its first event's: the entry's key
        self.id: UUID | None = None
        self.tenant_id = record.tenant_id
        self.activity_at = record.recorded_at
        self.change_id = record.request_id
        self.kinds: list[str] = []
        self.status = "success"
        self.error: dict[str, Any] | None = None
        self.request: dict[str, Any] = {}
        # Resources the request touched, in the order it first touched them.
        self.targets: dict[UUID, tuple[str, UUID, str | None, str | None]] = {}
        self.positions: list[int] = []
        self.properties: list[dict[str, Any]] = []

    def action(self) -> str:
        kinds = set(self.kinds)
        if "SubjectErased" in kinds:
            return "erase"
        if kinds & {"UserProvisioned", "GroupCreated"}:
            return "create"
        if kinds & {"UserDeprovisioned", "GroupDeleted"}:
            return "delete"
        if "UserDeactivated" in kinds:
            return "disable"
        if kinds:
            return "update"
        if self.status == "success" and self.request.get("action") in ("create", "delete"):
            return str(self.request["action"])  # an operator's command (a schema declared)
        if self.status == "success" and self.request.get("action") == "update":
            return "update"
        if self.status != "failure":
            return "other"  # nothing changed ("already match"), or an audited read
        method = str(self.request.get("method", "")).upper()
        return {"POST": "create", "DELETE": "delete"}.get(method, "update")

    def _target(self) -> tuple[Any, Any, Any, Any]:
        """(type, id, name, external id) of what the entry is about."""
        wanted = self.request.get("targetId")
        target = self.targets.get(_uuid(wanted)) if wanted else None  # type: ignore[arg-type]
        target = target or next(iter(self.targets.values()), None)
        if target:
            return target
        return self.request.get("targetType"), _uuid(wanted), self.request.get("targetName"), None

    def subject(self) -> UUID | None:
        """The user or group whose key seals the entry's values (an erasure's: none, clear)."""
        kind, rid, _, _ = self._target()
        return None if "SubjectErased" in self.kinds else audit_sealing.entry_subject(kind, rid)

    def row(self, keys: KeyRing) -> tuple[Any, ...]:
        error = self.error or {}
        kind, rid, name, source = self._target()
        # A detail sealed under the subject it quotes (a 409's holder) stays so, as stored.
        reason = detail_sealing.sealed_reason(error)
        if reason is None and error.get("detail") is not None:
            reason = bounded(str(error.get("detail")))
        name, source, properties, reason, sealed = audit_sealing.seal_entry(
            keys, self.tenant_id, self.transaction_id, self.subject(), name, source,
            self.properties, reason,
        )  # fmt: skip
        return (
            self.entry_position,
            self.transaction_id,
            self.id,
            self.tenant_id,
            self.activity_at,
            self.change_id,
            self.action(),
            self.status,
            error_code(error) if self.error else None,
            reason,
            kind,
            rid,
            name,
            source,
            self.request.get("initiatedBy"),
            self.request.get("method"),
            self.request.get("path"),
            self.request.get("status"),
            self.request.get("durationMs"),
            self.positions,
            properties,
            self.request.get("clientRequestId"),
            sealed,
        )


def _uuid(value: Any) -> UUID | None:
    try:
        return UUID(str(value)) if value else None
    except ValueError:
        return None


async def apply(
    conn: Conn,
    events: Sequence[Any],
    tables: Mapping[str, str] = LIVE,
    recorded: Sequence[Any] | None = None,
    held: Held | None = None,
) -> None:
    assert recorded is not None, "the audit projection needs the recorded events"
    resources = await audit_resources.load(conn, events, recorded, tables, held)
    # One entry per request: the events of one transaction with one request id.
    entries: dict[tuple[int, str | None], _Entry] = {}
    flats: dict[UUID, Mapping[str, str]] = {}
    erasures: list[tuple[UUID, UUID]] = []
    for event, record in zip(events, recorded, strict=True):
        key = (record.transaction_id, record.request_id)
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = _Entry(record)
        entry.positions.append(record.notification_id)
        fields: Any = event  # event classes made by @event have no static fields
        if isinstance(event, ProvisioningRequest.Event):
            entry.id = event.originator_id
            entry.status = fields.outcome
            entry.request = dict(fields.request)
            entry.error = dict(fields.error) if fields.error else None
            entry.properties += list(entry.request.pop("modifiedProperties", None) or [])
            continue
        if isinstance(event, Erasure.Event):
            # An erasure: an entry of its own, naming the subject by id only.
            entry.id = event.originator_id
            entry.kinds.append("SubjectErased")
            entry.request = {"method": "ERASE", "initiatedBy": fields.requested_by}
            _add_target(entry, fields.subject_type, fields.subject_id, ERASED, None)
            entry.properties.append(
                {"displayName": "reason", "oldValue": None, "newValue": fields.reason}
            )
            entry.properties.append(
                {
                    "displayName": "events made unreadable",
                    "oldValue": None,
                    "newValue": str(fields.events),
                }
            )
            erasures.append((fields.tenant_id, fields.subject_id))
            continue
        if not isinstance(event, User.Event | Group.Event):
            continue
        entry.kinds.append(type(event).__name__)
        rid = event.originator_id
        if is_erased(rid):
            # An erased subject: its values are gone; the entry keeps what happened, by id
            # (the same as service.erasure leaves the entries made before the erasure).
            kind = "User" if isinstance(event, User.Event) else "Group"
            _add_target(entry, kind, rid, ERASED, None)
            resources.pop(rid, None)
            if held is not None:
                held.drop((rid,))
            if type(event).__name__ == "GroupMembershipChanged" and not _is_main(entry, rid):
                # Named by its id in another subject's entry: that stays (as it was live).
                _members(entry, fields, group_labels.prefix(audit_sealing.ring(), rid, None))
            continue
        current = resources.get(rid)
        # Each resource's attributes as text, kept from one event to its next in the batch.
        before = flats[rid] if rid in flats else _flat(state_of(current))
        current = event.mutate(current)
        resources[rid] = current
        after = flats[rid] = _flat(state_of(current))
        if isinstance(current, User):
            name, source = after.get("userName"), after.get("externalId")
            entry.properties += _changes(before, after)
            _add_target(entry, "User", rid, name, source)
        elif isinstance(current, Group):
            _add_target(entry, "Group", rid, current.display_name, current.external_id)
            entry.properties += _changes(before, after)
            if type(event).__name__ == "GroupMembershipChanged":
                prefix = (
                    ""
                    if _is_main(entry, rid)
                    else group_labels.prefix(audit_sealing.ring(), rid, current.display_name)
                )
                _members(entry, fields, prefix)
    await audit_resources.save(conn, resources, tables, held)
    if entries:
        keys = await audit_sealing.load(conn, (e.subject() for e in entries.values()))
        rows = [dict(zip(_ENTRY_FIELDS, e.row(keys), strict=True)) for e in entries.values()]
        # The batch's entries as one JSON document: one parameter for PostgreSQL to read,
        # instead of 22 arrays whose every element the driver checks and encodes.
        await conn.execute(
            f"INSERT INTO {tables[ENTRIES]} ({ENTRY_COLUMNS}) SELECT {ENTRY_COLUMNS}"
            f" FROM jsonb_to_recordset($1::text::jsonb) AS e ({_ENTRY_TYPES})"
            " ON CONFLICT (entry_position) DO NOTHING",
            json_rows(rows),
        )
    if erasures:
        if held is not None:
            held.drop(subject for _, subject in erasures)
        await _scrub(conn, erasures, tables)


class Replay:
    """A rebuild's bulk replay: `apply` with the resources' copies held in memory between
    batches (audit_resources.Held), written by `flush` at its end."""

    def __init__(self) -> None:
        self.held = Held()

    async def apply(
        self, conn: Conn, events: Sequence[Any], tables: Mapping[str, str], recorded: Sequence[Any]
    ) -> None:
        await apply(conn, events, tables, recorded, self.held)

    async def flush(self, conn: Conn, tables: Mapping[str, str]) -> None:
        await audit_resources.flush(conn, self.held, tables)


async def _scrub(
    conn: Conn, erasures: Sequence[tuple[UUID, UUID]], tables: Mapping[str, str]
) -> None:
    """The erased subjects' entries keep what happened and when, not the values: the same
    as a replay makes of them once the key is gone (see `apply`)."""
    await conn.execute(
        f"UPDATE {tables[ENTRIES]} e SET target_name = $3, source_id = NULL,"
        " modified_properties = '[]'::jsonb, sealed = NULL,"
        " error_reason = CASE WHEN error_reason = $4 THEN $3 ELSE error_reason END"
        " FROM unnest($1::uuid[], $2::uuid[]) AS x (tenant_id, subject_id)"
        " WHERE e.tenant_id = x.tenant_id AND e.target_id = x.subject_id AND e.action <> 'erase'",
        [t for t, _ in erasures],
        [s for _, s in erasures],
        ERASED,
        PLACEHOLDER,
    )
    await conn.execute(
        f"DELETE FROM {tables[RESOURCES]} r USING unnest($1::uuid[], $2::uuid[])"
        " AS x (tenant_id, subject_id) WHERE r.tenant_id = x.tenant_id AND r.id = x.subject_id",
        [t for t, _ in erasures],
        [s for _, s in erasures],
    )


def _members(entry: _Entry, fields: Any, prefix: str) -> None:
    """A membership change's properties: members added, members removed (ids)."""
    if fields.added:
        entry.properties.append(
            {"displayName": f"{prefix}members added", "oldValue": None,
             "newValue": ", ".join(fields.added)}
        )  # fmt: skip
    if fields.removed:
        entry.properties.append(
            {"displayName": f"{prefix}members removed", "oldValue": ", ".join(fields.removed),
             "newValue": None}
        )  # fmt: skip


def _is_main(entry: _Entry, rid: UUID) -> bool:
    wanted = entry.request.get("targetId")
    return str(rid) == wanted or (not wanted and next(iter(entry.targets), None) == rid)


def _add_target(entry: _Entry, kind: str, rid: UUID, name: Any, source: Any) -> None:
    entry.targets[rid] = (kind, rid, name, source)


def describe(table: str, row: Mapping[str, Any]) -> str:
    if table == ENTRIES:
        return f"entry {row.get('id')} ({row.get('action')} {row.get('target_name')!r})"
    return f"resource {row.get('id')}"
