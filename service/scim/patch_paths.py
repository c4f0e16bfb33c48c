"""PATCH paths (RFC 7644 §3.5.2): what a path designates in a user document, what one PATCH
may spend resolving and applying them, and the value filters in them.

Paths are parsed by scim2-models (`Path`, errata 7122 grammar); the value filters are evaluated
here on the document's items, comparing strings case-insensitively.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from scim2_models import Path, SCIMException
from scim2_models.path import (
    AttrPath,
    CompareOperator,
    Comparison,
    FilterNode,
    LogicalExpr,
    LogicalOperator,
    Not,
    Present,
)

from domain.schema import (
    ACTIVE,
    MANAGER,
    NAME,
    NAME_SUB_ATTRIBUTES,
    USER_ENTERPRISE_ATTRIBUTES,
    USER_MULTI_VALUED_ATTRIBUTES,
)
from service.errors import ScimError, invalid_value
from service.scim.filter import MAX_FILTER_DEPTH, _check_nesting, _FilterError
from service.scim.representation import (
    CORE_STRING_ATTRIBUTES,
    ENTERPRISE_SCHEMA,
    MANAGER_SUB_ATTRIBUTES,
    MULTI_VALUED_SUB_ATTRIBUTES,
    READ_ONLY_ATTRIBUTES,
    USER_SCHEMA,
    is_undeclared_urn,
    lookup,
    to_item_value,
    undeclared_refused,
)

Kind = Literal["string", "boolean", "complex", "multi", "manager", "extension", "undeclared"]

# A path is refused past this many characters (400 invalidPath), and its value filter past
# MAX_FILTER_DEPTH levels of nesting, as a filter is: Entra's longest path is the manager's URN.
MAX_PATH_LENGTH = 1024
# What one PATCH may cost, in units of about 1.5 µs of CPU: a path costs 16 + 2 per character
# the first time it is parsed, an operation on a multi-valued attribute one unit per value it
# examines (times the terms of its value filter). Entra's PATCHes cost hundreds; the cap keeps
# the most costly PATCH a 2 MiB body can carry under 0.1 s of CPU.
MAX_PATCH_COST = 50_000


def invalid_path(detail: str) -> ScimError:
    return ScimError(400, detail, "invalidPath")


def no_target(detail: str) -> ScimError:
    return ScimError(400, detail, "noTarget")


# -- paths --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a path designates in the document, in canonical spelling."""

    path: str
    kind: Kind
    attribute: str  # the document key (the extension URN for kind "extension")
    extension: bool = False  # the attribute lives in the enterprise extension object
    sub_attribute: str | None = None
    value_filter: FilterNode | None = None
    terms: int = 1  # the value filter's comparisons: what matching one item costs
    urn: str | None = None  # the schema of an undeclared extension attribute

    @property
    def label(self) -> str:
        return f"{self.attribute}.{self.sub_attribute}" if self.sub_attribute else self.attribute


_CORE_KINDS: dict[str, Kind] = {
    **dict.fromkeys(CORE_STRING_ATTRIBUTES, "string"),
    ACTIVE: "boolean",
    NAME: "complex",
    **dict.fromkeys(USER_MULTI_VALUED_ATTRIBUTES, "multi"),
}
ENTERPRISE_KINDS: dict[str, Kind] = {
    **dict.fromkeys(USER_ENTERPRISE_ATTRIBUTES, "string"),
    MANAGER: "manager",
}


def sub_attributes(kind: Kind, attribute: str) -> tuple[str, ...]:
    if kind == "complex":
        return NAME_SUB_ATTRIBUTES
    if kind == "multi":
        return MULTI_VALUED_SUB_ATTRIBUTES[attribute]
    if kind == "manager":
        return MANAGER_SUB_ATTRIBUTES
    return ()


@dataclass
class Cost:
    """What one PATCH has spent (MAX_PATCH_COST), the paths it resolved, and its value cap."""

    max_values: int | None = None
    spent: int = 0
    targets: dict[str, Target] = field(default_factory=dict)
    reject: bool = False  # the tenant rejects undeclared extension attributes
    declared: frozenset[str] = frozenset()  # case-folded URNs the tenant declares

    def spend(self, units: int) -> None:
        self.spent += units
        if self.spent > MAX_PATCH_COST:
            raise invalid_value(
                "this PATCH is too costly to apply in one request (its paths, and the values"
                " of multi-valued attributes its operations examine); send its operations in"
                " several requests"
            )

    def is_declared(self, target: Target) -> bool:
        return (target.urn or "").casefold() in self.declared or (
            target.path.casefold() in self.declared
        )

    def resolve(self, text: str) -> Target:
        target = self.targets.get(text)
        if target is None:
            self.spend(16 + 2 * len(text))  # parsing costs ~20 µs, and more per character
            target = self.targets[text] = _resolve(text)
        if self.reject and target.kind == "undeclared" and not self.is_declared(target):
            raise undeclared_refused(target.urn or target.path)
        return target


def _resolve(text: str) -> Target:
    """The target of a PATCH path; 400 invalidPath (or mutability for read-only attributes)."""
    if text.casefold() == ENTERPRISE_SCHEMA.casefold():
        return Target(text, "extension", ENTERPRISE_SCHEMA)
    if len(text) > MAX_PATH_LENGTH:
        raise invalid_path(f"a path may be at most {MAX_PATH_LENGTH} characters long")
    try:
        _check_nesting(text)
    except _FilterError:
        raise invalid_path(f"a path's filter may nest at most {MAX_FILTER_DEPTH} levels") from None
    try:
        path = Path(text)
        parts, uri, value_filter = path.parts, path.schema, path.value_filter
    except (SCIMException, ValueError, RecursionError) as exc:
        raise invalid_path(f"invalid path {text[:100]!r}: {exc}") from None

    name, sub = parts[0], (parts[1] if len(parts) > 1 else None)
    scopes: list[tuple[bool, dict[str, Kind]]]
    if uri is None:
        # Unqualified names are core attributes, else enterprise ones ("manager" is Entra's).
        scopes = [(False, _CORE_KINDS), (True, ENTERPRISE_KINDS)]
    elif uri.casefold() == USER_SCHEMA.casefold():
        scopes = [(False, _CORE_KINDS)]
    elif uri.casefold() == ENTERPRISE_SCHEMA.casefold():
        scopes = [(True, ENTERPRISE_KINDS)]
    elif is_undeclared_urn(uri):
        if value_filter is not None:
            raise invalid_path(
                f"value filters on undeclared extension attributes are not supported: {text!r}"
            )
        return Target(text, "undeclared", name, sub_attribute=sub, urn=uri)
    else:
        raise invalid_path(f"unknown schema in path {text!r}")
    if not scopes[0][0] and lookup(READ_ONLY_ATTRIBUTES, name):
        raise ScimError(400, f"{name} is read-only", "mutability")

    found = _find(scopes, name)
    if found is None:
        raise invalid_path(f"unknown attribute in path {text!r}")
    extension, attribute, kind = found

    known_subs = sub_attributes(kind, attribute)
    sub_attribute = None
    if sub is not None:
        sub_attribute = lookup(known_subs, sub)
        if sub_attribute is None:
            raise invalid_path(f"unknown sub-attribute in path {text!r}")
    terms = 1
    if value_filter is not None:
        if kind not in ("multi", "manager"):
            raise invalid_path(f"{attribute} takes no value filter: {text!r}")
        terms = 0
        for filter_path in _filter_paths(value_filter):
            if filter_path.uri or filter_path.sub_attr or not lookup(known_subs, filter_path.attr):
                raise invalid_path(f"unknown attribute {filter_path} in the filter of {text!r}")
            terms += 1
    return Target(text, kind, attribute, extension, sub_attribute, value_filter, max(terms, 1))


def _find(scopes: list[tuple[bool, dict[str, Kind]]], name: str) -> tuple[bool, str, Kind] | None:
    for in_extension, kinds in scopes:
        attribute = lookup(kinds, name)
        if attribute is not None:
            return in_extension, attribute, kinds[attribute]
    return None


def _filter_paths(node: FilterNode) -> Iterator[AttrPath]:
    if isinstance(node, LogicalExpr):
        for term in node.terms:
            yield from _filter_paths(term)
    elif isinstance(node, Not):
        yield from _filter_paths(node.expr)
    elif isinstance(node, Comparison | Present):
        yield node.attr_path
    else:
        raise invalid_path(f"unsupported value filter {node}")


# -- value filters ------------------------------------------------------------------------


def _item_value(item: Mapping[str, Any], attr_path: AttrPath) -> Any:
    key = lookup(item, attr_path.attr)
    return None if key is None else item[key]


def compare(actual: Any, op: CompareOperator, expected: Any) -> bool:
    if actual is None or actual == "":
        return op == CompareOperator.ne and expected is not None
    if isinstance(actual, bool):
        if isinstance(expected, str) and expected.casefold() in ("true", "false"):
            expected = expected.casefold() == "true"
        if op == CompareOperator.eq:
            return actual is expected
        return op == CompareOperator.ne and actual is not expected
    if isinstance(actual, str) and isinstance(expected, str):
        return _STRING_CHECKS[op](actual.casefold(), expected.casefold())
    if op == CompareOperator.eq:
        return bool(actual == expected)
    return op == CompareOperator.ne and actual != expected


# Built once: a filter is matched against every value of an attribute, on every operation.
_STRING_CHECKS: dict[CompareOperator, Callable[[str, str], bool]] = {
    CompareOperator.eq: str.__eq__,
    CompareOperator.ne: str.__ne__,
    CompareOperator.co: lambda left, right: right in left,
    CompareOperator.sw: str.startswith,
    CompareOperator.ew: str.endswith,
    CompareOperator.gt: str.__gt__,
    CompareOperator.ge: str.__ge__,
    CompareOperator.lt: str.__lt__,
    CompareOperator.le: str.__le__,
}


def matches(node: FilterNode, item: Mapping[str, Any]) -> bool:
    if isinstance(node, LogicalExpr):
        results = (matches(term, item) for term in node.terms)
        return all(results) if node.op == LogicalOperator.and_ else any(results)
    if isinstance(node, Not):
        return not matches(node.expr, item)
    if isinstance(node, Present):
        return _item_value(item, node.attr_path) not in (None, "", [], {})
    if isinstance(node, Comparison):
        return compare(_item_value(item, node.attr_path), node.op, node.value)
    raise invalid_path(f"unsupported value filter {node}")


def equalities(node: FilterNode, target: Target) -> dict[str, Any] | None:
    """The item a filter describes, when it is `eq` comparisons joined by `and`; else None.

    `emails[type eq "work"]` describes {"type": "work"}: what a filtered add or replace that
    matches nothing creates.
    """
    if isinstance(node, LogicalExpr) and node.op == LogicalOperator.and_:
        item: dict[str, Any] = {}
        for term in node.terms:
            part = equalities(term, target)
            if part is None:
                return None
            item.update(part)
        return item
    if isinstance(node, Comparison) and node.op == CompareOperator.eq:
        sub = lookup(sub_attributes(target.kind, target.attribute), node.attr_path.attr)
        if sub is None or not isinstance(node.value, str | bool):
            return None
        try:
            value = to_item_value(node.value, target.attribute, sub)
        except ScimError:
            return None
        return None if value is None else {sub: value}
    return None



def put(container: dict[str, Any], key: str, value: Any) -> None:
    if value is None or value == "" or value == [] or value == {}:
        container.pop(key, None)
    else:
        container[key] = value


