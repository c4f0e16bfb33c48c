"""PATCH on the user attributes that hold more than one value: multi-valued ones (emails,
phoneNumbers, …), the complex `name`, and the enterprise manager."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scim2_models.path import CompareOperator

from domain.schema import MANAGER, NAME_SUB_ATTRIBUTES
from service.errors import invalid_value
from service.scim.patch_paths import Cost, Target, compare, equalities, matches, no_target, put
from service.scim.representation import (
    PRIMARY,
    check_multi_values,
    lookup,
    to_item,
    to_item_value,
    to_manager,
    to_string,
)

# Sub-attributes of an item that say nothing on their own: an item left with only these after a
# sub-attribute is cleared (an email without its address) is dropped.
_HOLLOW = frozenset({"type", PRIMARY})


def apply_complex(container: dict[str, Any], op: str, target: Target, value: Any) -> None:
    """name: add and replace merge the given sub-attributes (RFC 7644 §3.5.2.1, §3.5.2.3)."""
    current = dict(container.get(target.attribute) or {})
    if target.sub_attribute is not None:
        text = None if op == "remove" else to_string(value, target.label)
        put(current, target.sub_attribute, text)
    elif op == "remove" or value is None or value == "":
        current = {}
    else:
        if not isinstance(value, Mapping):
            raise invalid_value(f"{target.attribute} must be an object")
        for key, sub_value in value.items():
            sub = lookup(NAME_SUB_ATTRIBUTES, key) if isinstance(key, str) else None
            if sub is not None:
                put(current, sub, to_string(sub_value, f"{target.attribute}.{sub}"))
    put(container, target.attribute, current)


def _new_items(value: Any, target: Target, cost: Cost) -> list[dict[str, Any]]:
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


def apply_multi(
    container: dict[str, Any], op: str, target: Target, value: Any, cost: Cost
) -> None:
    items: list[dict[str, Any]] = [dict(item) for item in container.get(target.attribute) or []]
    before = len(items)
    value_filter, sub = target.value_filter, target.sub_attribute
    # Every branch below reads each current value once (a copy, a filter match, a lookup).
    cost.spend(before * (target.terms if value_filter is not None else 1))
    selected = [
        index
        for index, item in enumerate(items)
        if value_filter is None or matches(value_filter, item)
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
                put(items[index], sub, sub_value)
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
    put(container, target.attribute, items)


def _identity(item: Mapping[str, Any]) -> frozenset[tuple[str, Any]]:
    """Equal items (dicts with equal keys and values, in any order) have equal identities."""
    return frozenset(item.items())


def _folded(value: Any) -> tuple[str, Any]:
    """A sub-attribute value as `compare(..., eq, ...)` sees it: strings in any case."""
    return ("s", value.casefold()) if isinstance(value, str) else (type(value).__name__, value)


class _Listed:
    """The values an Entra-style remove lists, indexed: an item is named by a listed value when
    every sub-attribute the listing gives agrees (`compare` eq). One set per shape of listing
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


def _created(target: Target, *, strict: bool = True) -> dict[str, Any]:
    """The item a filtered add/replace creates (or rebuilds) from its filter's equalities."""
    assert target.value_filter is not None
    described = equalities(target.value_filter, target)
    if described is None:
        if strict:
            raise no_target(f"{target.path} matches no value and describes none to create")
        return {}
    return described


def apply_manager(container: dict[str, Any], op: str, target: Target, value: Any) -> None:
    """The enterprise manager: single-valued, kept as {"value": id}."""
    current = container.get(MANAGER)
    if target.value_filter is not None:
        if not isinstance(current, Mapping) or not matches(target.value_filter, current):
            if op == "remove":
                return  # a filter matching nothing removes nothing
            raise no_target(f"{target.path} matches no manager")
    if target.sub_attribute not in (None, "value"):
        return  # $ref and displayName are derived from the value, not stored
    if op == "remove":
        if target.sub_attribute is None and target.value_filter is None and value is not None:
            listed = to_manager(value)
            current_id = current.get("value") if isinstance(current, Mapping) else None
            if listed is None or not compare(current_id, CompareOperator.eq, listed):
                return  # Entra's style: remove only the listed manager
        container.pop(MANAGER, None)
        return
    if target.sub_attribute == "value":
        manager_id = to_string(value, f"{MANAGER}.value")
    else:
        manager_id = to_manager(value)
    put(container, MANAGER, None if manager_id is None else {"value": manager_id})


