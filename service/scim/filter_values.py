"""Filter comparisons of one value, in SQL: each attribute kind's operators, and the values
of undeclared extension attributes (jsonb kept as sent), read value by value.

`ValueComparisons` is the half of service/scim/filter.py's FilterCompiler that turns one
`attribute op value` into SQL; every value becomes a `$n` parameter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from scim2_models.path import AttrPath, CompareOperator

from service.scim.representation import is_undeclared_urn
from service.scim.sql_attributes import Attribute, AttributeMap, Kind, SqlParams

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


class ValueComparisons:
    """Comparisons of one value; FilterCompiler supplies the map, parameters and aliases."""

    map: AttributeMap
    params: SqlParams
    _scope: Mapping[str, Attribute] | None

    def _alias(self) -> str:
        raise NotImplementedError

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
