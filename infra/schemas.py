"""Extension schemas a tenant declares (`scimledger schemas add`), in RFC 7643 §7 form.

A declaration is checked here once (its URN, its attributes' names and characteristics), so
the request path only reads it: every request's token lookup carries its tenant's
declarations (infra/tenants.py), and nothing is cached.

Declaring and removing are recorded in the provisioning log like a SCIM write: a
`RequestRecorded` event in the same transaction, saying who (`by`), when, and what (each
attribute's characteristics before and after, under its full name).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg
import orjson

from domain.core_schemas import ENTERPRISE_SCHEMA_URN
from domain.request import ProvisioningRequest
from domain.schema import extension_attribute_name
from infra.eventstore import NOTIFY_CHANNEL, Conn, EventStore
from infra.tenants import UnknownTenant

RESOURCE_TYPES = ("User", "Group")
TYPES = ("string", "boolean", "integer", "decimal", "dateTime", "reference", "complex")
_URN = re.compile(r"urn:[A-Za-z0-9][A-Za-z0-9-]{0,31}(?::[!-~]+)+")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_CORE = ("urn:ietf:params:scim:schemas:core:", "urn:ietf:params:scim:api:")
_ENTERPRISE = ENTERPRISE_SCHEMA_URN.casefold()
MAX_ATTRIBUTES = 200


# Where each resource type keeps its extensions: the view and its jsonb column.
VIEWS = {"User": ("scim_users", "resource"), "Group": ("scim_groups", "extensions")}
INDEX_PREFIX = "xattr_"


def literal(text: str) -> str:
    """A SQL string literal (standard_conforming_strings: only the quote is special)."""
    return "'" + text.replace("'", "''") + "'"


def value_sql(column: str, urn: str, name: str) -> str:
    """The jsonb value of a declared attribute (URN and name as declared) in `column`."""
    return f"({column} -> {literal(urn)} -> {literal(name)})"


def text_sql(column: str, urn: str, name: str) -> str:
    """The same as text: what filters compare, indexes hold and uniqueness checks read."""
    return f"({column} -> {literal(urn)} ->> {literal(name)})"


def typed_sql(column: str, urn: str, name: str, kind: str) -> str:
    """A declared single-valued attribute read as its type (strings as text): what filters
    compare and sortBy orders by, and (lower-cased unless caseExact, for strings) what a unique
    index holds. A value of another JSON type (kept before the declaration) reads as NULL;
    dateTime goes through scim_timestamptz (migration 0019): with its offset, as an instant."""
    if kind in ("string", "reference"):
        return text_sql(column, urn, name)
    value = value_sql(column, urn, name)
    if kind == "boolean":
        return f"(CASE jsonb_typeof({value}) WHEN 'boolean' THEN {value}::boolean END)"
    if kind in ("integer", "decimal"):
        return f"(CASE jsonb_typeof({value}) WHEN 'number' THEN {value}::numeric END)"
    if kind == "dateTime":
        return f"scim_timestamptz({text_sql(column, urn, name)})"
    raise ValueError(f"no single SQL value for a {kind} attribute")


def index_name(
    resource_type: str,
    tenant_id: Any,
    urn: str,
    name: str,
    case_exact: bool,
    kind: str = "string",
) -> str:
    """The name of the unique index behind a declared attribute of one tenant."""
    table, column = VIEWS[resource_type]
    key = f"{table}\x1f{tenant_id}\x1f{index_key(column, urn, name, case_exact, kind)}"
    return f"{table}_{INDEX_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def index_key(column: str, urn: str, name: str, case_exact: bool, kind: str = "string") -> str:
    """What the unique index of a declared attribute holds of a document (`column`)."""
    value = typed_sql(column, urn, name, kind)
    return value if case_exact or kind not in ("string", "reference") else f"lower({value})"


UNIQUE_TYPES = ("string", "reference", "boolean", "integer", "decimal", "dateTime")


def unique_indexed(schema: Mapping[str, Any]) -> list[tuple[str, bool, str]]:
    """(name, caseExact, type) of the attributes a unique index stands behind: single-valued
    ones of a simple type with `uniqueness: server` or `global` (numbers unique as numbers,
    dateTimes as instants)."""
    return [
        (a["name"], bool(a.get("caseExact")), a.get("type", "string"))
        for a in schema.get("attributes", [])
        if a.get("uniqueness") in ("server", "global")
        and not a.get("multiValued")
        and a.get("type", "string") in UNIQUE_TYPES
    ]


def unique_indexes(tenant_id: Any, resource_type: str, schema: Mapping[str, Any]) -> dict[str, str]:
    """name -> CREATE UNIQUE INDEX statement (CONCURRENTLY) of each attribute of
    `unique_indexed`: the tenant's rows that carry it, by (tenant_id, the value, lower-cased
    unless caseExact). PostgreSQL enforces the uniqueness in the writing statement itself,
    and the filter `urn:…:attribute eq "x"` (the same expression) reads the index."""
    table, column = VIEWS[resource_type]
    out: dict[str, str] = {}
    for name, case_exact, kind in unique_indexed(schema):
        index = index_name(resource_type, tenant_id, schema["id"], name, case_exact, kind)
        key = index_key(column, schema["id"], name, case_exact, kind)
        value = typed_sql(column, schema["id"], name, kind)
        out[index] = (
            f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table}"
            f" (tenant_id, {key})"
            f" WHERE tenant_id = {literal(str(tenant_id))}::uuid AND {value} IS NOT NULL"
        )
    return out


async def _duplicate(
    conn: Conn, tenant_id: Any, resource_type: str, schema: Mapping[str, Any]
) -> str | None:
    """The first value a new unique attribute already holds twice in the tenant, if any."""
    table, column = VIEWS[resource_type]
    for name, case_exact, kind in unique_indexed(schema):
        key = index_key(column, schema["id"], name, case_exact, kind)
        found = await conn.fetchval(
            f"SELECT {key} FROM {table} WHERE tenant_id = $1 AND {key} IS NOT NULL"
            f" GROUP BY 1 HAVING count(*) > 1 LIMIT 1",
            tenant_id,
        )
        if found is not None:
            return f"{schema['id']}:{name} {str(found)[:100]!r}"
    return None


async def sync_indexes(conn: Conn) -> tuple[list[str], list[str]]:
    """Create the unique indexes today's declarations want and drop those none wants
    (CONCURRENTLY: writers go on; outside a transaction). (created, dropped)."""
    wanted: dict[str, str] = {}
    for row in await conn.fetch("SELECT tenant_id, resource_type, schema FROM tenant_schemas"):
        wanted.update(unique_indexes(row["tenant_id"], row["resource_type"], row["schema"]))
    tables = [table for table, _ in VIEWS.values()]
    present = {
        r["name"]: r["valid"]
        for r in await conn.fetch(
            "SELECT c.relname AS name, i.indisvalid AS valid FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid"
            " WHERE t.relname = any($1::text[])",
            tables,
        )
        if any(r["name"].startswith(f"{table}_{INDEX_PREFIX}") for table in tables)
    }
    dropped = [n for n, valid in present.items() if n not in wanted or not valid]
    for name in dropped:  # an invalid one is what an interrupted CONCURRENTLY build leaves
        await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    created = [n for n in wanted if n not in present or not present[n]]
    for name in created:
        try:
            await conn.execute(wanted[name])
        except asyncpg.UniqueViolationError:
            # A duplicate written between the declaration's check and the build: the
            # attribute is not enforced until the values differ and this runs again.
            await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            raise BadDeclaration(
                "values recorded while declaring are not unique; make them differ and declare again"
            ) from None
    return created, [n for n in dropped if n not in wanted]


class BadDeclaration(ValueError):
    """A schema document that cannot be declared; the message says why."""


def _attribute(raw: object, where: str, *, sub: bool = False) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise BadDeclaration(f"{where} must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise BadDeclaration(f"{where}.name must be an attribute name (RFC 7643 §2.1)")
    kind = raw.get("type", "string")
    if kind not in TYPES or (sub and kind == "complex"):
        allowed = TYPES[:-1] if sub else TYPES
        raise BadDeclaration(f"{where} ({name}): type must be one of {', '.join(allowed)}")
    attribute: dict[str, Any] = {
        "name": name,
        "type": kind,
        "multiValued": bool(raw.get("multiValued", False)),
        "description": str(raw.get("description", "")),
        "required": bool(raw.get("required", False)),
        "caseExact": bool(raw.get("caseExact", False)),
        "mutability": str(raw.get("mutability", "readWrite")),
        "returned": str(raw.get("returned", "default")),
        "uniqueness": str(raw.get("uniqueness", "none")),
    }
    canonical = raw.get("canonicalValues")
    if isinstance(canonical, list) and all(isinstance(v, str) for v in canonical):
        attribute["canonicalValues"] = list(canonical)
    if kind == "complex":
        subs = raw.get("subAttributes")
        if not isinstance(subs, list) or not subs:
            raise BadDeclaration(f"{where} ({name}): a complex attribute needs subAttributes")
        attribute["subAttributes"] = _attributes(subs, f"{where}.subAttributes", sub=True)
    return attribute


def _attributes(raw: list[Any], where: str, *, sub: bool = False) -> list[dict[str, Any]]:
    if len(raw) > MAX_ATTRIBUTES:
        raise BadDeclaration(f"{where}: at most {MAX_ATTRIBUTES} attributes")
    out = [_attribute(item, f"{where}[{i}]", sub=sub) for i, item in enumerate(raw)]
    names = [a["name"].casefold() for a in out]
    if len(set(names)) != len(names):
        raise BadDeclaration(f"{where}: attribute names must differ (case-insensitively)")
    return out


def parse_declaration(document: object) -> dict[str, Any]:
    """The canonical schema of a declaration, or BadDeclaration."""
    if not isinstance(document, Mapping):
        raise BadDeclaration("a schema must be a JSON object")
    urn = document.get("id")
    if not isinstance(urn, str) or _URN.fullmatch(urn) is None:
        raise BadDeclaration("id must be the schema's URN (urn:…)")
    if urn.casefold().startswith(_CORE) or urn.casefold() == _ENTERPRISE:
        raise BadDeclaration(f"{urn} is a schema of SCIM itself, not an extension")
    attributes = document.get("attributes")
    if not isinstance(attributes, list) or not attributes:
        raise BadDeclaration("attributes must be a non-empty list")
    return {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Schema"],
        "id": urn,
        "name": str(document.get("name") or urn.rpartition(":")[2]),
        "description": str(document.get("description", "")),
        "attributes": _attributes(attributes, "attributes"),
    }


async def _tenant_id(conn: Conn, tenant: str) -> Any:
    tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    if tenant_id is None:
        raise UnknownTenant(tenant)
    return tenant_id


async def declare(
    conn: Conn,
    store: EventStore,
    tenant: str,
    schema: dict[str, Any],
    resource_type: str,
    by: str,
) -> bool:
    """Declare (or re-declare) a schema; True when it is new for the tenant."""
    if resource_type not in RESOURCE_TYPES:
        raise BadDeclaration(f"resource type must be one of {', '.join(RESOURCE_TYPES)}")
    tenant_id = await _tenant_id(conn, tenant)
    async with conn.transaction():
        duplicate = await _duplicate(conn, tenant_id, resource_type, schema)
        if duplicate is not None:
            raise BadDeclaration(
                f"{duplicate} is held by more than one {resource_type.lower()} of tenant"
                f" {tenant}: it cannot be declared unique until the values differ"
            )
        before = await conn.fetchval(
            "DELETE FROM tenant_schemas WHERE tenant_id = $1 AND lower(urn) = lower($2)"
            " RETURNING schema",
            tenant_id,
            schema["id"],
        )
        await conn.execute(
            "INSERT INTO tenant_schemas (tenant_id, urn, resource_type, schema)"
            " VALUES ($1, $2, $3, $4)",
            tenant_id,
            schema["id"],
            resource_type,
            schema,
        )
        action = "update" if before is not None else "create"
        command = f"schemas add --resource-type {resource_type} {schema['id']}"
        await _record(conn, store, tenant_id, action, command, by, schema["id"], before, schema)
    await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    await sync_indexes(conn)
    return before is None


async def declared(conn: Conn, tenant: str) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT urn, resource_type, schema, declared_at FROM tenant_schemas"
            " WHERE tenant_id = $1 ORDER BY resource_type DESC, lower(urn)",
            await _tenant_id(conn, tenant),
        )
    )


async def withdraw(conn: Conn, store: EventStore, tenant: str, urn: str, by: str) -> bool:
    """Remove a declaration; values already recorded stay in the events."""
    tenant_id = await _tenant_id(conn, tenant)
    async with conn.transaction():
        before = await conn.fetchval(
            "DELETE FROM tenant_schemas WHERE tenant_id = $1 AND lower(urn) = lower($2)"
            " RETURNING schema",
            tenant_id,
            urn,
        )
        if before is None:
            return False
        command = f"schemas remove {before['id']}"
        await _record(conn, store, tenant_id, "delete", command, by, before["id"], before, None)
    await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    await sync_indexes(conn)
    return True


async def _record(
    conn: Conn,
    store: EventStore,
    tenant_id: Any,
    action: str,
    command: str,
    by: str,
    urn: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> None:
    """The provisioning-log entry of a declaration: its attributes' characteristics old -> new."""
    record = ProvisioningRequest.record(
        uuid.uuid4(),
        tenant_id,
        "success",
        {
            "method": "CLI",
            "path": command,
            "status": None,
            "initiatedBy": by,
            "client": None,
            "targetType": "Schema",
            "targetId": None,
            "targetName": urn,
            "clientRequestId": None,
            "durationMs": 0,
            "action": action,
            "modifiedProperties": schema_changes(urn, before, after),
        },
    )
    await store.append(conn, tenant_id, record.collect_events(), uuid.uuid4().hex)


def _characteristics(schema: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for attribute in (schema or {}).get("attributes", []):
        described = {k: v for k, v in attribute.items() if k not in ("name", "description")}
        out[attribute["name"].casefold()] = orjson.dumps(
            described, option=orjson.OPT_SORT_KEYS
        ).decode()
    return out


def schema_changes(
    urn: str, before: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """modifiedProperties of a declaration: each attribute by its full name, its
    characteristics (type, multiValued, mutability, …) as JSON text, old -> new."""
    old, new = _characteristics(before), _characteristics(after)
    names = {a["name"].casefold(): a["name"] for a in (before or {}).get("attributes", [])}
    names.update({a["name"].casefold(): a["name"] for a in (after or {}).get("attributes", [])})
    return [
        {
            "displayName": extension_attribute_name(urn, names[key]),
            "oldValue": old.get(key),
            "newValue": new.get(key),
        }
        for key in sorted(names)
        if old.get(key) != new.get(key)
    ]
