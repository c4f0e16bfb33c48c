"""PATCH on attributes of extensions no schema declares: kept as sent, on users and groups."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import orjson

from service.errors import invalid_value
from service.scim.patch_paths import Cost, Target, invalid_path, put
from service.scim.representation import check_multi_values, lookup

# `urn:…:2.0:User` reads as the attribute "User" of `urn:…:2.0`: a path naming a whole
# extension object, as Entra's no-path values do.
_VERSION = re.compile(r"\d+(?:\.\d+)*")


def _key_of(container: Mapping[str, Any], name: str, cost: Cost) -> str:
    """The spelling `container` already has for `name` (case-insensitive), else `name`."""
    if name in container:
        return name
    cost.spend(len(container))
    return lookup((k for k in container if isinstance(k, str)), name) or name


def _whole_extension(document: Mapping[str, Any], target: Target, cost: Cost) -> str | None:
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


def apply_undeclared(
    document: dict[str, Any], op: str, target: Target, value: Any, cost: Cost
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
                part = Target(f"{whole}:{key}", "undeclared", key, urn=whole)
                apply_undeclared(document, op, part, attribute_value, cost)
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
        put(sub_current, sub, None if op == "remove" else value)
        put(extension, name, sub_current)
        return
    if isinstance(value, list):
        check_multi_values(len(value), label, cost.max_values)
        cost.spend(len(value))
    if op == "remove":
        if isinstance(current, list) and value is not None and value != "":
            listed = {_json_key(v) for v in (value if isinstance(value, list) else [value])}
            cost.spend(len(current))
            put(extension, name, [v for v in current if _json_key(v) not in listed])
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
        put(extension, name, grown)
    elif op == "add" and isinstance(current, dict) and isinstance(value, Mapping):
        put(extension, name, {**current, **value})
    else:
        put(extension, name, value)


def apply_extension_patch(
    extensions: Mapping[str, Any],
    operations: list[tuple[str, str, Any]],
    max_values: int | None = None,
) -> dict[str, Any]:
    """Apply (op, path, value) operations on undeclared extension attributes to a resource's
    extensions (URN -> attributes), as a user PATCH applies them; a new dict is returned."""
    cost = Cost(max_values)
    document: dict[str, Any] = copy.deepcopy(dict(extensions))
    for op, path, value in operations:
        target = cost.resolve(path)
        if target.kind != "undeclared":
            raise invalid_path(f"unknown attribute in path {path[:100]!r}")
        apply_undeclared(document, op, target, value, cost)
    return {urn: attributes for urn, attributes in document.items() if attributes}


