"""SCIM filters (RFC 7644 §3.4.2.2) and sortBy compiled to parameterised SQL.

scim2-models parses the filter; `FilterCompiler` walks its tree and emits a boolean SQL
expression over the row alias of an `AttributeMap` (`u` for the users view). Nothing the
client sends is ever spliced into the SQL: attribute names only select entries of the map,
whose SQL fragments are constants of this module (or, for a tenant's declared extension
attributes, quoted literals of what the operator declared: service/scim/declared_filter.py),
and every value becomes a `$n` parameter.

Semantics:
- Each comparison is a boolean that may be NULL for an absent attribute; NOT is compiled as
  `(...) IS NOT TRUE`, so NULL always reads as "does not match", also under negation.
- `ne` follows RFC 7644: an absent attribute is not equal to anything (`IS DISTINCT FROM`).
  On a multi-valued attribute (`emails.value ne "x"`) it holds when no value equals "x".
- `x eq null` means `not (x pr)` and `x ne null` means `x pr`.
- caseExact=false strings compare `lower()` on both sides (RFC 7643 §2.2, §8.7.1).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any
from uuid import UUID

import orjson
from scim2_models import ScimFilter
from scim2_models.path import (
    AttrPath,
    CompareOperator,
    Comparison,
    FilterNode,
    FilterVisitor,
    LogicalExpr,
    LogicalOperator,
    Not,
    Path,
    Present,
    ValuePath,
)

from service.errors import ScimError
from service.scim.declared import Declared
from service.scim.representation import is_undeclared_urn

MAX_FILTER_LENGTH = 4096
"""Longest filter accepted, in characters."""
MAX_FILTER_DEPTH = 32
"""Deepest nesting accepted, counting parentheses, brackets, not, and/or and value paths."""

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
ENTERPRISE_USER_SCHEMA = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"

_ORDERING = {
    CompareOperator.gt: ">",
    CompareOperator.ge: ">=",
    CompareOperator.lt: "<",
    CompareOperator.le: "<=",
}
_PATTERNS = {
    CompareOperator.co: ("%", "%"),
    CompareOperator.sw: ("", "%"),
    CompareOperator.ew: ("%", ""),
}


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


def _json_string(name: str, *path: str) -> Attribute:
    """A string at resource->path[0]->...->>name (keys are constants of this module)."""
    prefix = "".join(f"->'{key}'" for key in path)
    return Attribute(name, Kind.STRING, f"u.resource{prefix}->>'{name}'")


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


def _plural(name: str, *, value_keys: str | None = None) -> Attribute:
    """Multi-valued value/display/type/primary attributes, e.g. emails (RFC 7643 §2.4)."""
    subs = [_item_string(sub) for sub in ("value", "display", "type")]
    return _multi(name, [*subs, _item_boolean("primary")], value_keys=value_keys)


_NAME_PARTS = (
    "formatted",
    "familyName",
    "givenName",
    "middleName",
    "honorificPrefix",
    "honorificSuffix",
)
_ADDRESS_PARTS = (
    "formatted",
    "streetAddress",
    "locality",
    "region",
    "postalCode",
    "country",
    "type",
)
_USER_STRINGS = (
    "nickName",
    "profileUrl",
    "title",
    "userType",
    "preferredLanguage",
    "locale",
    "timezone",
)
_ENTERPRISE_STRINGS = ("employeeNumber", "costCenter", "organization", "division", "department")

USER_ATTRIBUTES = AttributeMap(
    schema=USER_SCHEMA,
    attributes=attributes(
        _column("id", Kind.UUID, "id", case_exact=True),
        _column("externalId", Kind.STRING, "external_id", case_exact=True),
        _column("userName", Kind.STRING, "user_name"),
        _column("displayName", Kind.STRING, "display_name"),
        _column("active", Kind.BOOLEAN, "active"),
        *(_json_string(name) for name in _USER_STRINGS),
        Attribute(
            "name",
            Kind.COMPLEX,
            "u.resource->'name'",
            sub_attributes=attributes(*(_json_string(part, "name") for part in _NAME_PARTS)),
        ),
        _plural("emails", value_keys="scim_email_keys(u.resource)"),
        *(_plural(name) for name in ("phoneNumbers", "ims", "photos", "entitlements", "roles")),
        _plural("x509Certificates"),
        _multi(
            "addresses",
            [*(_item_string(part) for part in _ADDRESS_PARTS), _item_boolean("primary")],
        ),
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
            *(_json_string(name, "enterprise") for name in _ENTERPRISE_STRINGS),
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


# --- the compiler -------------------------------------------------------------------------


class _FilterError(Exception):
    """A filter this service cannot run; becomes 400 invalidFilter."""


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _check_text(value: str) -> str:
    if "\x00" in value:
        raise _FilterError("filter values cannot contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _FilterError("filter values must be valid Unicode (unpaired surrogate)") from None
    return value


def _check_nesting(expression: str) -> None:
    """Refuse brackets nested deeper than MAX_FILTER_DEPTH (outside string literals).

    scim2-models counts only not/and/or/value-path nodes, so `((((...))))` is otherwise
    unbounded.
    """
    depth = 0
    in_string = False
    escaped = False
    for char in expression:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "([":
            depth += 1
            if depth > MAX_FILTER_DEPTH:
                raise _FilterError(f"filter is nested deeper than {MAX_FILTER_DEPTH} levels")
        elif char in ")]":
            depth -= 1


def _parse_filter(expression: str) -> FilterNode:
    """Parse a filter with scim2-models; any failure is a _FilterError."""
    if len(expression) > MAX_FILTER_LENGTH:
        raise _FilterError(f"filter is longer than {MAX_FILTER_LENGTH} characters")
    _check_nesting(expression)
    try:
        return ScimFilter(expression).ast
    except RecursionError:
        raise _FilterError(f"filter is nested deeper than {MAX_FILTER_DEPTH} levels") from None
    except Exception as e:  # InvalidFilterException, or anything else the parser raises
        detail = getattr(e, "detail", None) or str(e) or type(e).__name__
        raise _FilterError(f"invalid filter: {detail}") from None


def _and_terms(node: FilterNode) -> tuple[FilterNode, ...]:
    if isinstance(node, LogicalExpr) and node.op == LogicalOperator.and_:
        return node.terms
    return (node,)


class FilterCompiler(FilterVisitor[str]):
    """Compile a parsed filter into a SQL boolean expression, adding values to `params`.

    `scope` resolves attribute names: the resource's AttributeMap at the top, the
    sub-attributes of a value row inside `attr[...]`.
    """

    def __init__(self, attribute_map: AttributeMap, params: SqlParams) -> None:
        self.map = attribute_map
        self.params = params
        self._scope: Mapping[str, Attribute] | None = None  # inside a value path
        self._depth = 0
        self._aliases = 0

    def compile(self, expression: str) -> str:
        return self.visit(_parse_filter(expression))

    def visit(self, node: FilterNode) -> str:
        # Counted as scim2-models counts (and/or chains, not, value paths); it refuses
        # deeper trees itself, this keeps the recursion bounded for trees built otherwise.
        nests = isinstance(node, LogicalExpr | Not | ValuePath)
        self._depth += nests
        try:
            if self._depth > MAX_FILTER_DEPTH:
                raise _FilterError(f"filter is nested deeper than {MAX_FILTER_DEPTH} levels")
            return super().visit(node)
        finally:
            self._depth -= nests

    # --- resolution

    def _resolve(self, path: AttrPath) -> tuple[Attribute, Attribute | None]:
        """The attribute a path names and the sub-attribute, if any."""
        if self._scope is not None:
            found = None if path.uri or path.sub_attr else self._scope.get(path.attr.lower())
            if found is None:
                raise _FilterError(f"unknown sub-attribute in value filter: {path}")
            return found, None
        attribute = self.map.lookup(path)
        if attribute is None:
            raise _FilterError(f"unknown attribute in filter: {path}")
        if path.sub_attr is None:
            return attribute, None
        sub = attribute.sub(path.sub_attr)
        if sub is None:
            raise _FilterError(f"unknown attribute in filter: {path}")
        return attribute, sub

    def _alias(self) -> str:
        self._aliases += 1
        return f"v{self._aliases}"

    def _exists(self, attribute: Attribute, condition: Callable[[str], str]) -> str:
        """EXISTS over the values of a multi-valued attribute; `condition(alias)` → SQL."""
        assert attribute.source is not None
        alias = self._alias()
        source = attribute.source.replace("{alias}", alias)
        return f"EXISTS (SELECT 1 FROM {source} WHERE {condition(alias)})"

    # --- nodes

    def visit_logical_expr(self, node: LogicalExpr) -> str:
        joiner = " AND " if node.op == LogicalOperator.and_ else " OR "
        return "(" + joiner.join(self.visit(term) for term in node.terms) + ")"

    def visit_not(self, node: Not) -> str:
        return f"(({self.visit(node.expr)}) IS NOT TRUE)"

    def visit_present(self, node: Present) -> str:
        if self._is_undeclared(node.attr_path):
            return self._undeclared(node.attr_path, _present_json)
        attribute, sub = self._resolve(node.attr_path)
        if attribute.kind is not Kind.MULTI:
            return _present(sub or attribute)
        if sub is None:
            return self._exists(attribute, lambda alias: "TRUE")
        target = sub
        return self._exists(attribute, lambda alias: _present(target.bound(alias)))

    def visit_comparison(self, node: Comparison) -> str:
        if node.value is None:
            if node.op == CompareOperator.eq:
                return self.visit_not(Not(Present(node.attr_path)))
            if node.op == CompareOperator.ne:
                return self.visit_present(Present(node.attr_path))
            raise _FilterError(f"{node.op.value} cannot compare with null")
        if self._is_undeclared(node.attr_path):
            if node.op == CompareOperator.ne:
                equal = Comparison(node.attr_path, CompareOperator.eq, node.value)
                return f"(({self.visit_comparison(equal)}) IS NOT TRUE)"
            return self._undeclared(
                node.attr_path, lambda item: self._compare_json(item, node.op, node.value)
            )
        attribute, sub = self._resolve(node.attr_path)
        if attribute.kind is not Kind.MULTI:
            return self._compare(sub or attribute, node.op, node.value)
        # A comparison on a multi-valued complex attribute compares its "value" (RFC 7644
        # §3.4.2.2); it holds when some value matches, and ne when none is equal.
        target = sub or attribute.sub("value")
        if target is None:
            raise _FilterError(f"{attribute.name} has no value sub-attribute to compare")
        op = node.op
        negate = op == CompareOperator.ne
        if negate:
            op = CompareOperator.eq
        if (
            attribute.value_keys is not None
            and target.name == "value"
            and op == CompareOperator.eq
            and isinstance(node.value, str)
            and node.value
        ):
            condition = self._value_key(attribute, "*", node.value)
        else:
            condition = self._exists(
                attribute, lambda alias: self._compare(target.bound(alias), op, node.value)
            )
        return f"(({condition}) IS NOT TRUE)" if negate else condition

    def visit_value_path(self, node: ValuePath) -> str:
        if self._is_undeclared(node.attr_path):
            raise _FilterError(
                f"value filters on undeclared extension attributes are not supported: "
                f"{node.attr_path}"
            )
        attribute, sub = self._resolve(node.attr_path)
        if self._scope is not None:
            raise _FilterError("value filters cannot be nested")
        if sub is not None or node.sub_attr is not None:
            raise _FilterError(f"invalid value path on {node.attr_path}")
        if attribute.kind is Kind.MULTI:
            keyed = self._keyed_value_path(attribute, node.val_filter)
            if keyed is not None:
                return keyed
            return self._exists(attribute, lambda alias: self._inner(attribute, alias, node))
        if attribute.sub_attributes:  # e.g. manager[value eq "..."], name[givenName sw "a"]
            return self._inner(attribute, None, node)
        raise _FilterError(f"{attribute.name} is not a multi-valued attribute")

    def _inner(self, attribute: Attribute, alias: str | None, node: ValuePath) -> str:
        subs = attribute.sub_attributes
        if alias is not None:
            subs = {name: sub.bound(alias) for name, sub in subs.items()}
        self._scope = subs
        try:
            return self.visit(node.val_filter)
        finally:
            self._scope = None

    def _keyed_value_path(self, attribute: Attribute, val_filter: FilterNode) -> str | None:
        """`emails[type eq "work" and value eq "x"]` (and Entra's `emails[type eq "work"].value
        eq "x"`) as a lookup in the GIN-indexed keys, plus EXISTS for any other terms."""
        if attribute.value_keys is None:
            return None
        value: str | None = None
        type_: str | None = None
        rest = False
        for term in _and_terms(val_filter):
            if (
                isinstance(term, Comparison)
                and term.op == CompareOperator.eq
                and isinstance(term.value, str)
                and term.value
                and term.attr_path.uri is None
                and term.attr_path.sub_attr is None
            ):
                name = term.attr_path.attr.lower()
                if name == "value" and value is None:
                    value = term.value
                    continue
                if name == "type" and type_ is None and ":" not in term.value:
                    type_ = term.value
                    continue
            rest = True
        if value is None:
            return None
        condition = self._value_key(attribute, type_ or "*", value)
        # The keys join type and value with ":", so a value holding ":" is rechecked.
        if rest or (type_ is not None and ":" in value):
            node = ValuePath(AttrPath(attribute.name), val_filter)
            full = self._exists(attribute, lambda alias: self._inner(attribute, alias, node))
            condition = f"({condition} AND {full})"
        return condition

    def _value_key(self, attribute: Attribute, type_: str, value: str) -> str:
        # lower() in SQL, so the key is lower-cased exactly as the indexed function does.
        key = self.params.add(_check_text(f"{type_}:{value}"))
        return f"{attribute.value_keys} @> ARRAY[lower({key})]::text[]"

    # --- undeclared extension attributes (kept as sent, under their URN)

    def _is_undeclared(self, path: AttrPath) -> bool:
        return (
            self._scope is None
            and self.map.undeclared is not None
            and path.uri is not None
            and is_undeclared_urn(path.uri)
            and path.uri.casefold() not in self.map.schemas
            and self.map.lookup(path) is None
        )

    def _undeclared(self, path: AttrPath, condition: Callable[[str], str]) -> str:
        """EXISTS over the values of an undeclared attribute: URN and name matched
        case-insensitively, a list read value by value, an object by its `value` (or by the
        path's sub-attribute); `condition(item)` tests one jsonb value."""
        assert path.uri is not None and self.map.undeclared is not None
        resource = self.map.undeclared
        a = self._alias()
        urn = self.params.add(_check_text(path.uri))
        name = self.params.add(_check_text(path.attr))
        sql = (
            f"EXISTS (SELECT 1 FROM jsonb_each(CASE jsonb_typeof({resource}) WHEN 'object'"
            f" THEN {resource} ELSE '{{}}'::jsonb END) AS {a}e(k, v)"
            f" CROSS JOIN LATERAL jsonb_each(CASE jsonb_typeof({a}e.v) WHEN 'object'"
            f" THEN {a}e.v ELSE '{{}}'::jsonb END) AS {a}a(k, v)"
            f" CROSS JOIN LATERAL jsonb_array_elements(CASE jsonb_typeof({a}a.v) WHEN 'array'"
            f" THEN {a}a.v ELSE jsonb_build_array({a}a.v) END) AS {a}x(v)"
        )
        where = f"lower({a}e.k) = lower({urn}::text) AND lower({a}a.k) = lower({name}::text)"
        if path.sub_attr is None:
            item = f"(CASE jsonb_typeof({a}x.v) WHEN 'object' THEN {a}x.v->'value' ELSE {a}x.v END)"
        else:
            sub = self.params.add(_check_text(path.sub_attr))
            sql += (
                f" CROSS JOIN LATERAL jsonb_each(CASE jsonb_typeof({a}x.v) WHEN 'object'"
                f" THEN {a}x.v ELSE '{{}}'::jsonb END) AS {a}s(k, v)"
            )
            where += f" AND lower({a}s.k) = lower({sub}::text)"
            item = f"{a}s.v"
        return f"{sql} WHERE {where} AND {condition(item)})"

    def _compare_json(self, item: str, op: CompareOperator, value: Any) -> str:
        """One undeclared value (jsonb) against a filter value: numbers as numbers, booleans
        as booleans, anything else as case-insensitive text (caseExact=false, RFC 7643 §7)."""
        if isinstance(value, bool):
            if op != CompareOperator.eq:
                raise _FilterError(f"{op.value} is not supported on a boolean")
            p = self.params.add("true" if value else "false")
            return f"lower({item} #>> '{{}}') = {p}::text"
        if isinstance(value, int | float):
            number = f"(CASE jsonb_typeof({item}) WHEN 'number' THEN ({item})::numeric END)"
            if op == CompareOperator.eq:
                return f"{number} = {self.params.add(json.dumps(value))}::text::numeric"
            if op in _ORDERING:
                p = self.params.add(json.dumps(value))
                return f"{number} {_ORDERING[op]} {p}::text::numeric"
            value = json.dumps(value)
        if not isinstance(value, str):
            raise _FilterError(f"unsupported filter value {value!r}")
        text = Attribute("value", Kind.STRING, f"({item} #>> '{{}}')")
        scalar = f"jsonb_typeof({item}) IN ('string', 'number', 'boolean')"
        return f"{scalar} AND {self._compare_string(text, op, value)}"

    # --- comparisons of one value

    def _compare(self, attribute: Attribute, op: CompareOperator, value: Any) -> str:
        kind = attribute.kind
        if kind is Kind.STRING:
            return self._compare_string(attribute, op, value)
        if kind is Kind.BOOLEAN:
            return self._compare_boolean(attribute, op, value)
        if kind is Kind.DATETIME:
            return self._compare_datetime(attribute, op, value)
        if kind is Kind.UUID:
            return self._compare_uuid(attribute, op, value)
        if kind is Kind.NUMBER:
            return self._compare_number(attribute, op, value)
        raise _FilterError(f"{attribute.name} is a complex attribute and cannot be compared")

    def _compare_string(self, attribute: Attribute, op: CompareOperator, value: Any) -> str:
        if isinstance(value, bool):
            raise _FilterError(f"{attribute.name} is a string and cannot compare with {value}")
        if isinstance(value, int | float):
            value = json.dumps(value)  # employeeNumber eq 1001 compares the text "1001"
        if not isinstance(value, str):
            raise _FilterError(f"unsupported value for {attribute.name}")
        _check_text(value)
        column = attribute.sql
        assert column is not None
        if not attribute.case_exact:
            column = f"lower({column})"

        def param(v: str) -> str:
            p = self.params.add(v)
            return p if attribute.case_exact else f"lower({p})"

        if op == CompareOperator.eq:
            return f"{column} = {param(value)}"
        if op == CompareOperator.ne:
            return f"{column} IS DISTINCT FROM {param(value)}"
        if op in _PATTERNS:
            before, after = _PATTERNS[op]
            return f"{column} LIKE {param(before + _escape_like(value) + after)}"
        return f"{column} {_ORDERING[op]} {param(value)}"

    def _compare_boolean(self, attribute: Attribute, op: CompareOperator, value: Any) -> str:
        if op not in (CompareOperator.eq, CompareOperator.ne):
            raise _FilterError(f"{op.value} is not supported on the boolean {attribute.name}")
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"  # Entra sends "True" / "False"
        if not isinstance(value, bool):
            raise _FilterError(f"{attribute.name} is a boolean: compare it with true or false")
        p = self.params.add(value)
        if op == CompareOperator.eq:
            return f"{attribute.sql} = {p}::boolean"
        return f"{attribute.sql} IS DISTINCT FROM {p}::boolean"

    def _compare_datetime(self, attribute: Attribute, op: CompareOperator, value: Any) -> str:
        if op in _PATTERNS:
            raise _FilterError(f"{op.value} is not supported on the dateTime {attribute.name}")
        when = _parse_datetime(value, attribute.name)
        p = self.params.add(when)
        if op == CompareOperator.eq:
            return f"{attribute.sql} = {p}::timestamptz"
        if op == CompareOperator.ne:
            return f"{attribute.sql} IS DISTINCT FROM {p}::timestamptz"
        return f"{attribute.sql} {_ORDERING[op]} {p}::timestamptz"

    def _compare_number(self, attribute: Attribute, op: CompareOperator, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _FilterError(f"{attribute.name} is a number: compare it with a number")
        p = f"{self.params.add(json.dumps(value))}::text::numeric"
        if op == CompareOperator.eq:
            return f"{attribute.sql} = {p}"
        if op == CompareOperator.ne:
            return f"{attribute.sql} IS DISTINCT FROM {p}"
        if op in _ORDERING:
            return f"{attribute.sql} {_ORDERING[op]} {p}"
        raise _FilterError(f"{op.value} is not supported on the number {attribute.name}")

    def _compare_uuid(self, attribute: Attribute, op: CompareOperator, value: Any) -> str:
        if op in (CompareOperator.eq, CompareOperator.ne):
            try:
                uuid = UUID(value) if isinstance(value, str) else None
            except ValueError:
                uuid = None
            if uuid is None:  # not an id we issue: equal to nothing
                return "FALSE" if op == CompareOperator.eq else "TRUE"
            p = self.params.add(uuid)
            if op == CompareOperator.eq:
                return f"{attribute.sql} = {p}::uuid"
            return f"{attribute.sql} IS DISTINCT FROM {p}::uuid"
        if not isinstance(value, str):
            raise _FilterError(f"{op.value} on {attribute.name} needs a string")
        # Ordering and substring operators compare the canonical (lower-case) text form.
        text = Attribute(attribute.name, Kind.STRING, f"({attribute.sql})::text", case_exact=True)
        return self._compare_string(text, op, value.lower())


def _present(attribute: Attribute) -> str:
    if attribute.present is not None:
        return attribute.present
    if attribute.kind is Kind.STRING:
        return f"({attribute.sql}) <> ''"
    if attribute.kind is Kind.COMPLEX:
        return f"({attribute.sql}) <> '{{}}'::jsonb"
    return f"({attribute.sql}) IS NOT NULL"


def _present_json(item: str) -> str:
    return (
        f"{item} IS NOT NULL AND {item} NOT IN"
        " ('null'::jsonb, '\"\"'::jsonb, '[]'::jsonb, '{}'::jsonb)"
    )


def _parse_datetime(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise _FilterError(f"{name} is a dateTime: compare it with an ISO 8601 string")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise _FilterError(f"{name}: {value!r} is not an ISO 8601 dateTime") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+05:00
        raise _FilterError(f"{name}: {value!r} is out of range") from None


# --- the lookups identity providers send ---------------------------------------------------

# `userName eq "x"`, `externalId eq "x"`, `displayName eq "x"`: what Entra sends before every
# create. Written exactly so (one space each side of a lower-case `eq`, a plain attribute name,
# a quoted value without escapes or control characters) a filter is always valid, and is
# compiled without the parser by the same comparison code the parser's tree would reach.
_SIMPLE_EQ = re.compile(r'([A-Za-z][A-Za-z0-9_]*) eq "([^"\\\x00-\x1f]*)"')
# The same lookup on an extension attribute by its full name (`urn:…:2.0:User:badge`):
# the URN is everything before the last colon.
_SIMPLE_URN_EQ = re.compile(r'(urn:[!-~]+):([A-Za-z][A-Za-z0-9_-]*) eq "([^"\\\x00-\x1f]*)"')


def _simple_eq(attribute_map: AttributeMap, expression: str, params: SqlParams) -> str | None:
    """The SQL of an `attr eq "value"` filter on a string attribute; None for anything else."""
    if len(expression) > MAX_FILTER_LENGTH:
        return None
    match = _SIMPLE_EQ.fullmatch(expression)
    if match is not None:
        path, value = AttrPath(match[1]), match[2]
    elif attribute_map.declared and (match := _SIMPLE_URN_EQ.fullmatch(expression)):
        path, value = AttrPath(match[2], uri=match[1]), match[3]
    else:
        return None
    attribute = attribute_map.lookup(path)
    if attribute is None or attribute.kind is not Kind.STRING:
        return None
    return FilterCompiler(attribute_map, params)._compare_string(
        attribute, CompareOperator.eq, value
    )


# --- public API -------------------------------------------------------------------------


def compile_filter(attribute_map: AttributeMap, expression: str, params: SqlParams) -> str:
    """A SQL boolean expression for a SCIM filter; parameters are added only on success."""
    scratch = SqlParams(list(params.values))
    try:
        sql = _simple_eq(attribute_map, expression, scratch) or FilterCompiler(
            attribute_map, scratch
        ).compile(expression)
    except ScimError:
        raise
    except _FilterError as e:
        raise ScimError(400, str(e), "invalidFilter") from None
    except RecursionError:
        detail = f"filter is nested deeper than {MAX_FILTER_DEPTH} levels"
        raise ScimError(400, detail, "invalidFilter") from None
    except Exception as e:  # never a 500 for a filter
        raise ScimError(400, f"invalid filter: {e}", "invalidFilter") from None
    params.values.extend(scratch.values[len(params.values) :])
    return sql


def compile_sort(attribute_map: AttributeMap, sort_by: str) -> str:
    """The SQL expression to ORDER BY for sortBy; caseExact=false strings sort by lower()."""
    try:
        path = Path(sort_by.strip()).ast
    except Exception:
        path = None
    if not isinstance(path, AttrPath):
        raise ScimError(400, "sortBy must be an attribute name", "invalidValue")
    attribute = attribute_map.lookup(path)
    if attribute is not None and attribute.kind is not Kind.MULTI and path.sub_attr:
        attribute = attribute.sub(path.sub_attr)
    if attribute is None:
        raise ScimError(400, f"sortBy names an unknown attribute: {path}", "invalidValue")
    if attribute.kind in (Kind.MULTI, Kind.COMPLEX) or attribute.sql is None:
        raise ScimError(400, f"cannot sort by {path}: not a single value", "invalidValue")
    if attribute.kind is Kind.STRING and not attribute.case_exact:
        return f"lower({attribute.sql})"
    return attribute.sql


def user_filter_sql(expression: str, params: SqlParams, declared: Declared | None = None) -> str:
    """A SQL boolean expression over alias u; raises service.errors.ScimError(400, detail,
    "invalidFilter")."""
    return compile_filter(with_declared(USER_ATTRIBUTES, declared), expression, params)


def user_sort_sql(sort_by: str, declared: Declared | None = None) -> str:
    """SQL expression (no user data inlined) for sortBy; unknown/multi-valued attribute ->
    ScimError(400, ..., "invalidValue")."""
    return compile_sort(with_declared(USER_ATTRIBUTES, declared), sort_by)


# --- the groups view ---------------------------------------------------------------------

GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"

GROUP_ATTRIBUTES = AttributeMap(
    schema=GROUP_SCHEMA,
    undeclared="g.extensions",
    attributes=attributes(
        Attribute("id", Kind.UUID, "g.id", case_exact=True),
        Attribute("externalId", Kind.STRING, "g.external_id", case_exact=True),
        Attribute("displayName", Kind.STRING, "g.display_name"),
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


def group_filter_sql(expression: str, params: SqlParams, declared: Declared | None = None) -> str:
    """A SQL boolean expression over alias g (scim_groups); 400 invalidFilter on error."""
    return compile_filter(with_declared(GROUP_ATTRIBUTES, declared), expression, params)


def group_sort_sql(sort_by: str, declared: Declared | None = None) -> str:
    return compile_sort(with_declared(GROUP_ATTRIBUTES, declared), sort_by)


def with_declared(attribute_map: AttributeMap, declared: Declared | None) -> AttributeMap:
    """The map with a tenant's declared extensions' attributes (over `map.undeclared`)."""
    if not declared or attribute_map.undeclared is None:
        return attribute_map
    # Built once per set of declarations (every request brings its tenant's, as data).
    key = (id(attribute_map), orjson.dumps(list(declared.values())))
    found = _DECLARED_MAPS.get(key)
    if found is None:
        from service.scim.declared_filter import declared_tables

        if len(_DECLARED_MAPS) >= _MAX_DECLARED_MAPS:
            _DECLARED_MAPS.clear()
        tables = declared_tables(attribute_map.undeclared, declared)
        found = _DECLARED_MAPS[key] = dataclasses.replace(attribute_map, declared=tables)
    return found


_DECLARED_MAPS: dict[tuple[int, bytes], AttributeMap] = {}
_MAX_DECLARED_MAPS = 512
