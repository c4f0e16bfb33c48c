"""`attributes` and `excludedAttributes` (RFC 7644 §3.4.2.5, §3.9): which parts of a SCIM
resource a reply carries, by case-insensitive paths from the resource root."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from domain.schema import ENTERPRISE_SCHEMA_URN, USER_SCHEMA_URN

_CORE_SCHEMA_PREFIX = "urn:ietf:params:scim:schemas:core:"

# A selection tree: case-folded name -> None (the whole value) or the selected sub-names.
_Tree = dict[str, "_Tree | None"]


def _segments(path: str, schemas: Iterable[str]) -> list[str] | None:
    """A path as case-folded segments from the resource root, or None when it is unknown.

    `urn:...:core:2.0:User:name.givenName` -> ["name", "givenname"]; an extension's attributes
    live under its URN key: `urn:...:enterprise:2.0:User:employeeNumber` ->
    ["urn:...:enterprise:2.0:user", "employeenumber"].
    """
    folded = path.strip().casefold()
    if not folded.startswith("urn:"):
        return folded.split(".") if folded else None
    matches = [urn for urn in schemas if folded == urn or folded.startswith(urn + ":")]
    if not matches:
        return None
    urn = max(matches, key=len)
    prefix = [] if urn.startswith(_CORE_SCHEMA_PREFIX) else [urn]
    rest = folded[len(urn) + 1 :]
    segments = prefix + rest.split(".") if rest else prefix
    return segments or None


def _tree(paths: str, resource: Mapping[str, Any]) -> _Tree:
    schemas = {USER_SCHEMA_URN.casefold(), ENTERPRISE_SCHEMA_URN.casefold()}
    schemas.update(key.casefold() for key in resource if key.casefold().startswith("urn:"))
    schemas.update(urn.casefold() for urn in resource.get("schemas") or () if isinstance(urn, str))
    tree: _Tree = {}
    for path in paths.split(","):
        segments = _segments(path, schemas)
        if not segments:
            continue
        node = tree
        for segment in segments[:-1]:
            if segment in node and node[segment] is None:
                break  # the whole value is already selected
            child = node.get(segment)
            if child is None:
                child = node[segment] = {}
            node = child
        else:
            node[segments[-1]] = None
    return tree


def _project(value: Any, tree: _Tree | None, *, keep: bool) -> Any:
    """Keep (attributes) or drop (excludedAttributes) what `tree` selects; None when empty."""
    if tree is None:
        return None if not keep else value
    if isinstance(value, list):
        items = [_project(item, tree, keep=keep) for item in value]
        return [item for item in items if item not in (None, {})] or None
    if not isinstance(value, Mapping):
        return value if not keep else None
    result: dict[str, Any] = {}
    for key, sub_value in value.items():
        folded = key.casefold()
        if folded in tree:
            projected = _project(sub_value, tree[folded], keep=keep)
            if projected is not None:
                result[key] = projected
        elif not keep:
            result[key] = sub_value
    return result or None


def select_attributes(
    resource: dict[str, Any],
    attributes: str | None,
    excluded_attributes: str | None,
    *,
    always: frozenset[str] = frozenset({"id", "schemas"}),
) -> dict[str, Any]:
    """Apply `attributes` then `excludedAttributes` (comma-separated, case-insensitive paths).

    Sub-attributes (`name.givenName`, `emails.value`) and schema-qualified names
    (`urn:...:enterprise:2.0:User:employeeNumber`) are understood; unknown names are ignored.
    The `always` attributes are returned whatever is asked; `meta` only when `attributes` is
    absent or lists it. Returns a new dict; the resource is not changed.
    """
    always_folded = {name.casefold() for name in always}
    result: dict[str, Any] = copy.deepcopy(resource)
    if attributes and attributes.strip():
        tree = _tree(attributes, result)
        result = _project(result, tree, keep=True) or {}
    if excluded_attributes and excluded_attributes.strip():
        tree = {
            key: sub
            for key, sub in _tree(excluded_attributes, resource).items()
            if key not in always_folded
        }
        result = _project(result, tree, keep=False) or {}
    # Always-returned attributes come back whole, and everything in the resource's order.
    return {
        key: copy.deepcopy(value) if key.casefold() in always_folded else result[key]
        for key, value in resource.items()
        if key.casefold() in always_folded or key in result
    }
