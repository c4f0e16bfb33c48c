"""How SCIM attributes read in SQL: the filter and sortBy tables of the users and groups views.

An `AttributeMap` names, for one resource type, each attribute a filter or sortBy may use and
the SQL expression over the view's row that reads it (`u` for scim_users, `g` for
scim_groups). The expressions are constants of this module; a tenant's declared extension
attributes are added per request (service/scim/declared_filter.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from scim2_models.path import AttrPath

from domain.core_schemas import ENTERPRISE_USER, GROUP, USER, named
from domain.core_schemas import Attribute as Spec
from domain.schema import EMAILS, MANAGER
from domain.schema import ENTERPRISE_SCHEMA_URN as ENTERPRISE_USER_SCHEMA
from domain.schema import GROUP_SCHEMA_URN as GROUP_SCHEMA
from domain.schema import USER_SCHEMA_URN as USER_SCHEMA


class SqlParams:
    """Positional parameters of one query; `add` returns the placeholder of a new value.

    The list given is used as it is (not copied), so `values` is what the query runs with.
    """

    def __init__(self, values: list[Any] | None = None) -> None:
        self.values: list[Any] = values if values is not None else []

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


class Kind(Enum):
    STRING = "string"
    BOOLEAN = "boolean"
    DATETIME = "dateTime"
    UUID = "uuid"  # ids this service issues: compared as UUIDs, never an error
    NUMBER = "number"  # declared integer and decimal extension attributes
    COMPLEX = "complex"  # single-valued complex: reached through its sub-attributes
    MULTI = "multi"  # multi-valued complex: rows of `source`, tested with EXISTS


@dataclass(frozen=True)
class Attribute:
    """How one SCIM attribute reads in SQL.

    `sql` is an expression over the row alias (for MULTI sub-attributes over `{alias}`, the
    element row). For STRING it yields text, BOOLEAN boolean, DATETIME timestamptz, UUID uuid,
    COMPLEX a jsonb object (or None when `present` says how to test it). MULTI attributes give
    `source`, a FROM item over `{alias}` yielding one row per value; `value_keys`, when set, is
    a text[] of lower-cased "type:value" and "*:value" keys (GIN-indexed) for `value eq` lookups.
    """

    name: str
    kind: Kind
    sql: str | None = None
    case_exact: bool = False
    sub_attributes: Mapping[str, Attribute] = field(default_factory=dict)
    present: str | None = None
    source: str | None = None
    value_keys: str | None = None

    def sub(self, name: str) -> Attribute | None:
        return self.sub_attributes.get(name.lower())

    def bound(self, alias: str) -> Attribute:
        """This (sub-)attribute with `{alias}` replaced by the alias of a value row."""
        if self.sql is None or "{alias}" not in self.sql:
            return self
        return dataclasses.replace(self, sql=self.sql.replace("{alias}", alias))


def attributes(*items: Attribute) -> dict[str, Attribute]:
    """A name → attribute table keyed by lower-cased name (SCIM names are case-insensitive)."""
    return {item.name.lower(): item for item in items}


@dataclass(frozen=True)
class AttributeMap:
    """The filterable attributes of one resource type.

    `attributes` are the core schema's; `extensions` maps an extension schema URN to its
    attributes. An unqualified name is looked up in the core schema first, then in the
    extensions (so `employeeNumber` and `manager` work without the enterprise URN).
    """

    schema: str
    attributes: Mapping[str, Attribute]
    extensions: Mapping[str, Mapping[str, Attribute]] = field(default_factory=dict)
    # The jsonb object (over the row alias) holding undeclared extensions under their URNs.
    undeclared: str | None = None
    # A tenant's declared extensions: URN -> their single-valued attributes (the others are
    # filtered like undeclared ones); only with their URN.
    declared: Mapping[str, Mapping[str, Attribute]] = field(default_factory=dict)

    @property
    def schemas(self) -> frozenset[str]:
        """The case-folded URNs of the schemas this map declares."""
        return frozenset(urn.casefold() for urn in (self.schema, *self.extensions))

    def lookup(self, path: AttrPath) -> Attribute | None:
        name = path.attr.lower()
        if path.uri is not None:
            uri = path.uri.lower()
            if uri == self.schema.lower():
                return self.attributes.get(name)
            for schema, table in self.extensions.items():
                if uri == schema.lower():
                    return table.get(name)
            for schema, table in self.declared.items():
                if uri == schema.lower():
                    return table.get(name)
            return None
        found = self.attributes.get(name)
        if found is None:
            for table in self.extensions.values():
                found = table.get(name)
                if found is not None:
                    break
        return found


# --- the users view ---------------------------------------------------------------------


def _column(name: str, kind: Kind, column: str, *, case_exact: bool = False) -> Attribute:
    return Attribute(name, kind, f"u.{column}", case_exact=case_exact)


def _json_string(name: str, *path: str, case_exact: bool = False) -> Attribute:
    """A string at resource->path[0]->...->>name (names of domain/core_schemas.py)."""
    prefix = "".join(f"->'{key}'" for key in path)
    return Attribute(name, Kind.STRING, f"u.resource{prefix}->>'{name}'", case_exact=case_exact)


def _item_string(name: str, *, case_exact: bool = False) -> Attribute:
    return Attribute(name, Kind.STRING, f"{{alias}}.v->>'{name}'", case_exact=case_exact)


def _item_boolean(name: str) -> Attribute:
    # Booleans are JSON true/false; a string "True" (as Entra sends them) reads the same.
    sql = f"CASE lower({{alias}}.v->>'{name}') WHEN 'true' THEN true WHEN 'false' THEN false END"
    return Attribute(name, Kind.BOOLEAN, sql)


def _multi(name: str, subs: Iterable[Attribute], *, value_keys: str | None = None) -> Attribute:
    array = f"u.resource->'{name}'"
    source = (
        f"jsonb_array_elements(CASE WHEN jsonb_typeof({array}) = 'array'"
        f" THEN {array} ELSE '[]'::jsonb END) AS {{alias}}(v)"
    )
    return Attribute(
        name,
        Kind.MULTI,
        array,
        sub_attributes=attributes(*subs),
        source=source,
        value_keys=value_keys,
    )


# Columns of the users view; the other attributes are read from its resource JSON.
_USER_COLUMNS = {"userName": "user_name", "displayName": "display_name", "active": "active"}


def _user_attribute(spec: Spec, *path: str) -> Attribute | None:
    """How an attribute of domain/core_schemas.py reads in the users view: its name, type,
    caseExact and sub-attributes from the definition, its place from how the view keeps it.
    readOnly ones (groups: the groups' membership rows) are not filtered on."""
    name, case_exact = spec["name"], spec["caseExact"]
    if spec["mutability"] == "readOnly":
        return None
    if spec["multiValued"]:
        subs = [
            _item_boolean(sub["name"])
            if sub["type"] == "boolean"
            else _item_string(sub["name"], case_exact=sub["caseExact"])
            for sub in spec["subAttributes"]
        ]
        keys = "scim_email_keys(u.resource)" if name == EMAILS else None
        return _multi(name, subs, value_keys=keys)
    if spec["type"] == "complex":
        keys = "".join(f"->'{key}'" for key in (*path, name))
        return Attribute(
            name,
            Kind.COMPLEX,
            f"u.resource{keys}",
            sub_attributes=attributes(*_user_attributes(spec["subAttributes"], *path, name)),
        )
    if not path and name in _USER_COLUMNS:
        kind = Kind.BOOLEAN if spec["type"] == "boolean" else Kind.STRING
        return _column(name, kind, _USER_COLUMNS[name], case_exact=case_exact)
    return _json_string(name, *path, case_exact=case_exact)


def _user_attributes(specs: list[Spec], *path: str) -> list[Attribute]:
    return [a for a in (_user_attribute(spec, *path) for spec in specs) if a is not None]


USER_ATTRIBUTES = AttributeMap(
    schema=USER_SCHEMA,
    attributes=attributes(
        _column("id", Kind.UUID, "id", case_exact=True),
        _column("externalId", Kind.STRING, "external_id", case_exact=True),
        *_user_attributes(USER["attributes"]),
        Attribute(
            "meta",
            Kind.COMPLEX,
            present="TRUE",
            sub_attributes=attributes(
                _column("created", Kind.DATETIME, "created"),
                _column("lastModified", Kind.DATETIME, "last_modified"),
                Attribute("resourceType", Kind.STRING, "'User'::text", case_exact=True),
            ),
        ),
    ),
    undeclared="u.resource",
    extensions={
        ENTERPRISE_USER_SCHEMA: attributes(
            *_user_attributes(
                [a for a in ENTERPRISE_USER["attributes"] if a["name"] != MANAGER], "enterprise"
            ),
            # The canonical state keeps the manager's id only; manager and manager.value
            # both compare it.
            Attribute(
                "manager",
                Kind.UUID,
                "u.manager_id",
                sub_attributes=attributes(Attribute("value", Kind.UUID, "u.manager_id")),
            ),
        )
    },
)


# --- the groups view ---------------------------------------------------------------------
# Its columns and the membership rows are how the view keeps Group's attributes
# (domain/core_schemas.py); members' $ref and display are not filtered on.

GROUP_ATTRIBUTES = AttributeMap(
    schema=GROUP_SCHEMA,
    undeclared="g.extensions",
    attributes=attributes(
        Attribute("id", Kind.UUID, "g.id", case_exact=True),
        Attribute("externalId", Kind.STRING, "g.external_id", case_exact=True),
        Attribute(
            "displayName",
            Kind.STRING,
            "g.display_name",
            case_exact=named(GROUP, "displayName")["caseExact"],
        ),
        # One row per member: members.value eq "id" is a primary-key probe.
        Attribute(
            "members",
            Kind.MULTI,
            "TRUE",
            sub_attributes=attributes(
                Attribute("value", Kind.UUID, "{alias}.member_id"),
                Attribute("type", Kind.STRING, "{alias}.member_type"),
            ),
            source=(
                "(SELECT gm.member_id, gm.member_type FROM scim_group_members gm"
                " WHERE gm.tenant_id = g.tenant_id AND gm.group_id = g.id) AS {alias}"
            ),
        ),
        Attribute(
            "meta",
            Kind.COMPLEX,
            present="TRUE",
            sub_attributes=attributes(
                Attribute("created", Kind.DATETIME, "g.created"),
                Attribute("lastModified", Kind.DATETIME, "g.last_modified"),
                Attribute("resourceType", Kind.STRING, "'Group'::text", case_exact=True),
            ),
        ),
    ),
)
