"""SCIM PATCH (RFC 7644 §3.5.2) on a user document, in both styles Entra sends.

Paths are parsed by scim2-models (`Path`, errata 7122 grammar); the value filters in them are
evaluated here on the document's items, comparing strings case-insensitively. Operations apply
to a copy of the document, so a failing operation leaves nothing half-applied.

Lenient where Entra needs it: op and attribute names in any case, booleans as "True"/"False",
the manager as a list of one object, several attributes in one op without a path (dotted and
URN keys), and a filtered update of a multi-valued attribute that matches nothing creates the
item (`emails[type eq "work"].value`). Strict where a client names a target: read-only paths
are refused (mutability), unknown ones too (invalidPath).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
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
from service.errors import ScimError, invalid_syntax, invalid_value
from service.scim.filter import MAX_FILTER_DEPTH, _check_nesting, _FilterError
from service.scim.representation import (
    CORE_STRING_ATTRIBUTES,
    ENTERPRISE_SCHEMA,
    MANAGER_SUB_ATTRIBUTES,
    MULTI_VALUED_SUB_ATTRIBUTES,
    PRIMARY,
    READ_ONLY_ATTRIBUTES,
    USER_SCHEMA,
    check_multi_values,
    is_undeclared_urn,
    lookup,
    to_boolean,
    to_item,
    to_item_value,
    to_manager,
    to_string,
    undeclared_refused,
)

PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
OPS = ("add", "replace", "remove")

Kind = Literal["string", "boolean", "complex", "multi", "manager", "extension", "undeclared"]
# Sub-attributes of an item that say nothing on their own: an item left with only these after a
# sub-attribute is cleared (an email without its address) is dropped.
_HOLLOW = frozenset({"type", PRIMARY})

# A path is refused past this many characters (400 invalidPath), and its value filter past
# MAX_FILTER_DEPTH levels of nesting, as a filter is: Entra's longest path is the manager's URN.
MAX_PATH_LENGTH = 1024
# What one PATCH may cost, in units of about 1.5 µs of CPU: a path costs 16 + 2 per character
# the first time it is parsed, an operation on a multi-valued attribute one unit per value it
# examines (times the terms of its value filter). Entra's PATCHes cost hundreds; the cap keeps
# the most costly PATCH a 2 MiB body can carry under 0.1 s of CPU.
MAX_PATCH_COST = 50_000


def _invalid_path(detail: str) -> ScimError:
    return ScimError(400, detail, "invalidPath")


def _no_target(detail: str) -> ScimError:
    return ScimError(400, detail, "noTarget")


# -- the request --------------------------------------------------------------------------


def _field(body: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    """(present, value) of a member whose name is matched case-insensitively."""
    key = lookup((k for k in body if isinstance(k, str)), name)
    return (False, None) if key is None else (True, body[key])


def _operation(raw: object, index: int) -> dict[str, Any]:
    """One operation as {"op": "add"|"replace"|"remove", "path": str | None, "value": ...}.

    A missing value reads as null (for add and replace: clear the target).
    """
    if not isinstance(raw, Mapping):
        raise invalid_syntax(f"Operations[{index}] must be an object")
    _, op = _field(raw, "op")
    if not isinstance(op, str) or op.casefold() not in OPS:
        raise invalid_syntax(f"Operations[{index}].op must be add, replace or remove: {op!r}")
    _, path = _field(raw, "path")
    if path is not None and not isinstance(path, str):
        raise invalid_syntax(f"Operations[{index}].path must be a string")
    _, value = _field(raw, "value")
    return {"op": op.casefold(), "path": (path or "").strip() or None, "value": value}


def parse_patch_request(body: Any, max_operations: int | None = None) -> list[dict[str, Any]]:
    """The operations of a PatchOp request, normalised; 400 invalidSyntax when malformed,
    400 invalidValue beyond `max_operations` (Settings.max_patch_operations)."""
    if not isinstance(body, Mapping):
        raise invalid_syntax("the PATCH body must be a JSON object")
    _, schemas = _field(body, "schemas")
    if not isinstance(schemas, list) or not any(
        isinstance(urn, str) and urn.casefold() == PATCH_SCHEMA.casefold() for urn in schemas
    ):
        raise invalid_syntax(f"a PATCH body must list the schema {PATCH_SCHEMA}")
    present, operations = _field(body, "Operations")
    if not present or not isinstance(operations, list):
        raise invalid_syntax("a PATCH body must carry an Operations list")
    if max_operations is not None and len(operations) > max_operations:
        raise invalid_value(
            f"a PATCH may carry at most {max_operations} operations, not {len(operations)}"
        )
    return [_operation(raw, index) for index, raw in enumerate(operations)]


# -- paths --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
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
_ENTERPRISE_KINDS: dict[str, Kind] = {
    **dict.fromkeys(USER_ENTERPRISE_ATTRIBUTES, "string"),
    MANAGER: "manager",
}


def _sub_attributes(kind: Kind, attribute: str) -> tuple[str, ...]:
    if kind == "complex":
        return NAME_SUB_ATTRIBUTES
    if kind == "multi":
        return MULTI_VALUED_SUB_ATTRIBUTES[attribute]
    if kind == "manager":
        return MANAGER_SUB_ATTRIBUTES
    return ()


@dataclass
class _Cost:
    """What one PATCH has spent (MAX_PATCH_COST), the paths it resolved, and its value cap."""

    max_values: int | None = None
    spent: int = 0
    targets: dict[str, _Target] = field(default_factory=dict)
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

    def is_declared(self, target: _Target) -> bool:
        return (target.urn or "").casefold() in self.declared or (
            target.path.casefold() in self.declared
        )

    def resolve(self, text: str) -> _Target:
        target = self.targets.get(text)
        if target is None:
            self.spend(16 + 2 * len(text))  # parsing costs ~20 µs, and more per character
            target = self.targets[text] = _resolve(text)
        if self.reject and target.kind == "undeclared" and not self.is_declared(target):
            raise undeclared_refused(target.urn or target.path)
        return target


def _resolve(text: str) -> _Target:
    """The target of a PATCH path; 400 invalidPath (or mutability for read-only attributes)."""
    if text.casefold() == ENTERPRISE_SCHEMA.casefold():
        return _Target(text, "extension", ENTERPRISE_SCHEMA)
    if len(text) > MAX_PATH_LENGTH:
        raise _invalid_path(f"a path may be at most {MAX_PATH_LENGTH} characters long")
    try:
        _check_nesting(text)
    except _FilterError:
        raise _invalid_path(f"a path's filter may nest at most {MAX_FILTER_DEPTH} levels") from None
    try:
        path = Path(text)
        parts, uri, value_filter = path.parts, path.schema, path.value_filter
    except (SCIMException, ValueError, RecursionError) as exc:
        raise _invalid_path(f"invalid path {text[:100]!r}: {exc}") from None

    name, sub = parts[0], (parts[1] if len(parts) > 1 else None)
    scopes: list[tuple[bool, dict[str, Kind]]]
    if uri is None:
        # Unqualified names are core attributes, else enterprise ones ("manager" is Entra's).
        scopes = [(False, _CORE_KINDS), (True, _ENTERPRISE_KINDS)]
    elif uri.casefold() == USER_SCHEMA.casefold():
        scopes = [(False, _CORE_KINDS)]
    elif uri.casefold() == ENTERPRISE_SCHEMA.casefold():
        scopes = [(True, _ENTERPRISE_KINDS)]
    elif is_undeclared_urn(uri):
        if value_filter is not None:
            raise _invalid_path(
                f"value filters on undeclared extension attributes are not supported: {text!r}"
            )
        return _Target(text, "undeclared", name, sub_attribute=sub, urn=uri)
    else:
        raise _invalid_path(f"unknown schema in path {text!r}")
    if not scopes[0][0] and lookup(READ_ONLY_ATTRIBUTES, name):
        raise ScimError(400, f"{name} is read-only", "mutability")

    found = _find(scopes, name)
    if found is None:
        raise _invalid_path(f"unknown attribute in path {text!r}")
    extension, attribute, kind = found

    known_subs = _sub_attributes(kind, attribute)
    sub_attribute = None
    if sub is not None:
        sub_attribute = lookup(known_subs, sub)
        if sub_attribute is None:
            raise _invalid_path(f"unknown sub-attribute in path {text!r}")
    terms = 1
    if value_filter is not None:
        if kind not in ("multi", "manager"):
            raise _invalid_path(f"{attribute} takes no value filter: {text!r}")
        terms = 0
        for filter_path in _filter_paths(value_filter):
            if filter_path.uri or filter_path.sub_attr or not lookup(known_subs, filter_path.attr):
                raise _invalid_path(f"unknown attribute {filter_path} in the filter of {text!r}")
            terms += 1
    return _Target(text, kind, attribute, extension, sub_attribute, value_filter, max(terms, 1))


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
        raise _invalid_path(f"unsupported value filter {node}")


# -- value filters ------------------------------------------------------------------------


def _item_value(item: Mapping[str, Any], attr_path: AttrPath) -> Any:
    key = lookup(item, attr_path.attr)
    return None if key is None else item[key]


def _compare(actual: Any, op: CompareOperator, expected: Any) -> bool:
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


def _matches(node: FilterNode, item: Mapping[str, Any]) -> bool:
    if isinstance(node, LogicalExpr):
        results = (_matches(term, item) for term in node.terms)
        return all(results) if node.op == LogicalOperator.and_ else any(results)
    if isinstance(node, Not):
        return not _matches(node.expr, item)
    if isinstance(node, Present):
        return _item_value(item, node.attr_path) not in (None, "", [], {})
    if isinstance(node, Comparison):
        return _compare(_item_value(item, node.attr_path), node.op, node.value)
    raise _invalid_path(f"unsupported value filter {node}")


def _equalities(node: FilterNode, target: _Target) -> dict[str, Any] | None:
    """The item a filter describes, when it is `eq` comparisons joined by `and`; else None.

    `emails[type eq "work"]` describes {"type": "work"}: what a filtered add or replace that
    matches nothing creates.
    """
    if isinstance(node, LogicalExpr) and node.op == LogicalOperator.and_:
        item: dict[str, Any] = {}
        for term in node.terms:
            part = _equalities(term, target)
            if part is None:
                return None
            item.update(part)
        return item
    if isinstance(node, Comparison) and node.op == CompareOperator.eq:
        sub = lookup(_sub_attributes(target.kind, target.attribute), node.attr_path.attr)
        if sub is None or not isinstance(node.value, str | bool):
            return None
        try:
            value = to_item_value(node.value, target.attribute, sub)
        except ScimError:
            return None
        return None if value is None else {sub: value}
    return None


# -- applying operations ------------------------------------------------------------------


def _put(container: dict[str, Any], key: str, value: Any) -> None:
    if value is None or value == "" or value == [] or value == {}:
        container.pop(key, None)
    else:
        container[key] = value


def _container(document: dict[str, Any], target: _Target) -> dict[str, Any]:
    if not target.extension:
        return document
    extension = document.get(ENTERPRISE_SCHEMA)
    if not isinstance(extension, dict):
        extension = document[ENTERPRISE_SCHEMA] = {}
    return extension


def _apply(document: dict[str, Any], op: str, target: _Target, value: Any, cost: _Cost) -> None:
    container = _container(document, target)
    if target.kind == "string":
        _put(
            container, target.attribute, None if op == "remove" else to_string(value, target.label)
        )
    elif target.kind == "boolean":
        coerced = None if op == "remove" else to_boolean(value, target.label)
        _put(container, target.attribute, coerced)
    elif target.kind == "complex":
        _apply_complex(container, op, target, value)
    elif target.kind == "multi":
        _apply_multi(container, op, target, value, cost)
    elif target.kind == "manager":
        _apply_manager(container, op, target, value)
    elif target.kind == "undeclared":
        _apply_undeclared(document, op, target, value, cost)
    else:
        _apply_extension(document, op, value, cost)


def _apply_complex(container: dict[str, Any], op: str, target: _Target, value: Any) -> None:
    """name: add and replace merge the given sub-attributes (RFC 7644 §3.5.2.1, §3.5.2.3)."""
    current = dict(container.get(target.attribute) or {})
    if target.sub_attribute is not None:
        text = None if op == "remove" else to_string(value, target.label)
        _put(current, target.sub_attribute, text)
    elif op == "remove" or value is None or value == "":
        current = {}
    else:
        if not isinstance(value, Mapping):
            raise invalid_value(f"{target.attribute} must be an object")
        for key, sub_value in value.items():
            sub = lookup(NAME_SUB_ATTRIBUTES, key) if isinstance(key, str) else None
            if sub is not None:
                _put(current, sub, to_string(sub_value, f"{target.attribute}.{sub}"))
    _put(container, target.attribute, current)


def _new_items(value: Any, target: _Target, cost: _Cost) -> list[dict[str, Any]]:
    """The items an add or replace carries: a list of objects, or one object."""
    if value is None or value == "":
        return []
    raw_items = value if isinstance(value, list) else [value]
    check_multi_values(len(raw_items), target.attribute, cost.max_values)
    cost.spend(len(raw_items))
    if not all(isinstance(raw, Mapping) for raw in raw_items):
        raise invalid_value(f"{target.attribute} must be a list of objects")
    return [item for item in (to_item(raw, target.attribute) for raw in raw_items) if item]


def _hollow(item: Mapping[str, Any]) -> bool:
    return set(item) <= _HOLLOW


def _apply_multi(
    container: dict[str, Any], op: str, target: _Target, value: Any, cost: _Cost
) -> None:
    items: list[dict[str, Any]] = [dict(item) for item in container.get(target.attribute) or []]
    before = len(items)
    value_filter, sub = target.value_filter, target.sub_attribute
    # Every branch below reads each current value once (a copy, a filter match, a lookup).
    cost.spend(before * (target.terms if value_filter is not None else 1))
    selected = [
        index
        for index, item in enumerate(items)
        if value_filter is None or _matches(value_filter, item)
    ]
    touched: list[dict[str, Any]] = []

    if op == "remove":
        if sub is not None:
            for index in selected:
                items[index].pop(sub, None)
            items = [item for item in items if not _hollow(item)]
        elif value_filter is None and value is not None:
            # Entra's style: remove only the listed values, not the whole attribute.
            listed = _Listed(_new_items(value, target, cost))
            cost.spend(before * len(listed.shapes))
            items = [item for item in items if not listed.names(item)]
        else:
            chosen = set(selected)
            items = [item for index, item in enumerate(items) if index not in chosen]

    elif sub is not None:
        sub_value = to_item_value(value, target.attribute, sub)
        if selected:
            for index in selected:
                _put(items[index], sub, sub_value)
                touched.append(items[index])
            items = [item for item in items if not _hollow(item)]
        elif sub_value is not None:
            item = _created(target) | {sub: sub_value}
            items.append(item)
            touched.append(item)

    elif value_filter is not None:
        if value is None or value == "":
            chosen = set(selected)
            items = [item for index, item in enumerate(items) if index not in chosen]
        else:
            new_items = _new_items(value, target, cost)
            if len(new_items) != 1:
                raise invalid_value(f"{target.path} takes one object as its value")
            new = new_items[0]
            if selected:
                for index in selected:
                    base = items[index] if op == "add" else _created(target, strict=False)
                    items[index] = base | new
                    touched.append(items[index])
            else:
                item = _created(target) | new
                items.append(item)
                touched.append(item)

    else:
        new_items = _new_items(value, target, cost)
        if op == "replace" or value is None or value == "":
            items = []
        # Exact repeats say nothing new: one hash per value, not a comparison with each other.
        present = {_identity(item) for item in items}
        for item in new_items:
            identity = _identity(item)
            if identity not in present:
                present.add(identity)
                items.append(item)
                touched.append(item)

    if len(items) > before:
        check_multi_values(len(items), target.attribute, cost.max_values)
    if touched and any(item.get(PRIMARY) is True for item in touched):
        # RFC 7644 §3.5.2: a value made primary demotes the others.
        new_ids = {id(item) for item in touched}
        for item in items:
            if item.get(PRIMARY) is True and id(item) not in new_ids:
                item[PRIMARY] = False
    _put(container, target.attribute, items)


def _identity(item: Mapping[str, Any]) -> frozenset[tuple[str, Any]]:
    """Equal items (dicts with equal keys and values, in any order) have equal identities."""
    return frozenset(item.items())


def _folded(value: Any) -> tuple[str, Any]:
    """A sub-attribute value as `_compare(..., eq, ...)` sees it: strings in any case."""
    return ("s", value.casefold()) if isinstance(value, str) else (type(value).__name__, value)


class _Listed:
    """The values an Entra-style remove lists, indexed: an item is named by a listed value when
    every sub-attribute the listing gives agrees (`_compare` eq). One set per shape of listing
    (which sub-attributes it gives; at most 2^8), so checking an item costs one lookup per
    shape instead of a comparison with every listed value."""

    def __init__(self, listed: list[dict[str, Any]]) -> None:
        self.shapes: dict[tuple[str, ...], set[tuple[tuple[str, Any], ...]]] = {}
        for value in listed:
            if value:
                keys = tuple(sorted(value))
                self.shapes.setdefault(keys, set()).add(tuple(_folded(value[k]) for k in keys))

    def names(self, item: Mapping[str, Any]) -> bool:
        for keys, values in self.shapes.items():
            if all(item.get(k) not in (None, "") for k in keys):
                if tuple(_folded(item[k]) for k in keys) in values:
                    return True
        return False


def _created(target: _Target, *, strict: bool = True) -> dict[str, Any]:
    """The item a filtered add/replace creates (or rebuilds) from its filter's equalities."""
    assert target.value_filter is not None
    described = _equalities(target.value_filter, target)
    if described is None:
        if strict:
            raise _no_target(f"{target.path} matches no value and describes none to create")
        return {}
    return described


def _apply_manager(container: dict[str, Any], op: str, target: _Target, value: Any) -> None:
    """The enterprise manager: single-valued, kept as {"value": id}."""
    current = container.get(MANAGER)
    if target.value_filter is not None:
        if not isinstance(current, Mapping) or not _matches(target.value_filter, current):
            if op == "remove":
                return  # a filter matching nothing removes nothing
            raise _no_target(f"{target.path} matches no manager")
    if target.sub_attribute not in (None, "value"):
        return  # $ref and displayName are derived from the value, not stored
    if op == "remove":
        if target.sub_attribute is None and target.value_filter is None and value is not None:
            listed = to_manager(value)
            current_id = current.get("value") if isinstance(current, Mapping) else None
            if listed is None or not _compare(current_id, CompareOperator.eq, listed):
                return  # Entra's style: remove only the listed manager
        container.pop(MANAGER, None)
        return
    if target.sub_attribute == "value":
        manager_id = to_string(value, f"{MANAGER}.value")
    else:
        manager_id = to_manager(value)
    _put(container, MANAGER, None if manager_id is None else {"value": manager_id})


def _apply_extension(document: dict[str, Any], op: str, value: Any, cost: _Cost) -> None:
    """The whole enterprise extension object: add and replace merge its attributes."""
    if op == "remove" or value is None or value == "":
        document.pop(ENTERPRISE_SCHEMA, None)
        return
    if not isinstance(value, Mapping):
        raise invalid_value(f"{ENTERPRISE_SCHEMA} must be an object")
    for key, sub_value in value.items():
        attribute = lookup(_ENTERPRISE_KINDS, key) if isinstance(key, str) else None
        if attribute is not None:
            target = _Target(key, _ENTERPRISE_KINDS[attribute], attribute, extension=True)
            _apply(document, op, target, sub_value, cost)


# `urn:…:2.0:User` reads as the attribute "User" of `urn:…:2.0`: a path naming a whole
# extension object, as Entra's no-path values do.
_VERSION = re.compile(r"\d+(?:\.\d+)*")


def _key_of(container: Mapping[str, Any], name: str, cost: _Cost) -> str:
    """The spelling `container` already has for `name` (case-insensitive), else `name`."""
    if name in container:
        return name
    cost.spend(len(container))
    return lookup((k for k in container if isinstance(k, str)), name) or name


def _whole_extension(document: Mapping[str, Any], target: _Target, cost: _Cost) -> str | None:
    """The document key of the extension object a path names as a whole, or None."""
    if target.sub_attribute is not None or target.urn is None:
        return None
    key = _key_of(document, target.path, cost)
    if key in document:
        return key
    version = target.urn.rpartition(":")[2]
    if _VERSION.fullmatch(version) and target.attribute.casefold() in ("user", "group"):
        return target.path
    return None


def _json_key(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _apply_undeclared(
    document: dict[str, Any], op: str, target: _Target, value: Any, cost: _Cost
) -> None:
    """An attribute of an extension no schema declares: kept as sent. add appends to a list and
    merges into an object, replace sets, remove clears (or, given a value, removes the listed
    values of a list: Entra's style)."""
    assert target.urn is not None
    whole = _whole_extension(document, target, cost)
    if whole is not None:
        if op == "remove" or value is None or value == "":
            document.pop(whole, None)
            return
        if not isinstance(value, Mapping):
            raise invalid_value(f"{target.path} must be an object of attributes")
        for key, attribute_value in value.items():
            if isinstance(key, str):
                part = _Target(f"{whole}:{key}", "undeclared", key, urn=whole)
                _apply_undeclared(document, op, part, attribute_value, cost)
        return
    urn = _key_of(document, target.urn, cost)
    extension = document.get(urn)
    if not isinstance(extension, dict):
        extension = document[urn] = {}
    name = _key_of(extension, target.attribute, cost)
    current = extension.get(name)
    label = f"{urn}:{name}"
    if target.sub_attribute is not None:
        if current is not None and not isinstance(current, dict):
            raise invalid_value(f"{label} is not an object: {target.path} names nothing")
        sub_current = dict(current or {})
        sub = _key_of(sub_current, target.sub_attribute, cost)
        _put(sub_current, sub, None if op == "remove" else value)
        _put(extension, name, sub_current)
        return
    if isinstance(value, list):
        check_multi_values(len(value), label, cost.max_values)
        cost.spend(len(value))
    if op == "remove":
        if isinstance(current, list) and value is not None and value != "":
            listed = {_json_key(v) for v in (value if isinstance(value, list) else [value])}
            cost.spend(len(current))
            _put(extension, name, [v for v in current if _json_key(v) not in listed])
        else:
            extension.pop(name, None)
    elif op == "add" and isinstance(current, list) and value is not None and value != "":
        cost.spend(len(current))
        present = {_json_key(v) for v in current}
        grown = list(current)
        for item in value if isinstance(value, list) else [value]:
            if _json_key(item) not in present:
                present.add(_json_key(item))
                grown.append(item)
        check_multi_values(len(grown), label, cost.max_values)
        _put(extension, name, grown)
    elif op == "add" and isinstance(current, dict) and isinstance(value, Mapping):
        _put(extension, name, {**current, **value})
    else:
        _put(extension, name, value)


def _apply_without_path(document: dict[str, Any], op: str, value: Any, cost: _Cost) -> None:
    """add/replace with no path: each key of the value object is a path (plain, dotted as
    `name.givenName`, or URN-qualified), or the extension URN with an object. As in a PUT
    body, read-only and unknown keys are ignored."""
    if not isinstance(value, Mapping):
        raise invalid_value(f"{op} without a path takes an object of attributes as its value")
    for key, attribute_value in value.items():
        if not isinstance(key, str):
            continue
        try:
            target = cost.resolve(key)
        except ScimError as exc:
            if exc.scim_type in ("invalidPath", "mutability"):
                continue
            raise
        _apply(document, op, target, attribute_value, cost)


def _tidy(document: dict[str, Any]) -> None:
    urns = [key for key in document if key.startswith("urn:")]
    for urn in urns:
        if not document[urn]:
            del document[urn]
    document["schemas"] = [USER_SCHEMA, *(urn for urn in urns if urn in document)]


def apply_extension_patch(
    extensions: Mapping[str, Any],
    operations: list[tuple[str, str, Any]],
    max_values: int | None = None,
) -> dict[str, Any]:
    """Apply (op, path, value) operations on undeclared extension attributes to a resource's
    extensions (URN -> attributes), as a user PATCH applies them; a new dict is returned."""
    cost = _Cost(max_values)
    document: dict[str, Any] = copy.deepcopy(dict(extensions))
    for op, path, value in operations:
        target = cost.resolve(path)
        if target.kind != "undeclared":
            raise _invalid_path(f"unknown attribute in path {path[:100]!r}")
        _apply_undeclared(document, op, target, value, cost)
    return {urn: attributes for urn, attributes in document.items() if attributes}


def apply_patch(
    document: Mapping[str, Any],
    operations: list[dict[str, Any]],
    max_values: int | None = None,
    *,
    reject: bool = False,
    declared: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Apply PATCH operations to a user document (see representation.user_document).

    Returns a new document; the input is untouched. All or nothing: the first invalid operation
    raises ScimError and nothing is applied. A remove whose value filter matches nothing is a
    no-op (RFC 7644 allows 400 noTarget; robustness wins, Entra never relies on either).
    `max_values` (Settings.max_multi_values): 400 invalidValue for an operation that lists more
    values, or grows a multi-valued attribute past it. Past MAX_PATCH_COST: 400 invalidValue.
    `reject` (the tenant's `--undeclared reject`): an undeclared extension attribute is 400.
    """
    cost = _Cost(max_values, reject=reject, declared=declared)
    result = copy.deepcopy(dict(document))
    for index, raw in enumerate(operations):
        operation = _operation(raw, index)
        op, path, value = operation["op"], operation["path"], operation["value"]
        if path is None:
            if op == "remove":
                raise _no_target(f"Operations[{index}]: remove needs a path")
            _apply_without_path(result, op, value, cost)
        else:
            _apply(result, op, cost.resolve(path), value, cost)
    _tidy(result)
    return result
