"""SCIM PATCH (RFC 7644 §3.5.2) on a user document, in both styles Entra sends: the request,
and the operations applied. Paths, their filters and the cost cap: patch_paths.py; the
multi-valued attributes: patch_values.py; undeclared extensions: patch_undeclared.py.

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
from collections.abc import Mapping
from typing import Any

from service.errors import ScimError, invalid_syntax, invalid_value
from service.scim.patch_paths import (
    ENTERPRISE_KINDS,
    MAX_PATCH_COST,
    Cost,
    Target,
    no_target,
    put,
)
from service.scim.patch_undeclared import apply_extension_patch, apply_undeclared
from service.scim.patch_values import apply_complex, apply_manager, apply_multi
from service.scim.representation import (
    ENTERPRISE_SCHEMA,
    USER_SCHEMA,
    lookup,
    to_boolean,
    to_string,
)

__all__ = ["MAX_PATCH_COST", "apply_extension_patch", "apply_patch", "parse_patch_request"]

PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
OPS = ("add", "replace", "remove")


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


# -- applying operations ------------------------------------------------------------------


def _container(document: dict[str, Any], target: Target) -> dict[str, Any]:
    if not target.extension:
        return document
    extension = document.get(ENTERPRISE_SCHEMA)
    if not isinstance(extension, dict):
        extension = document[ENTERPRISE_SCHEMA] = {}
    return extension


def _apply(document: dict[str, Any], op: str, target: Target, value: Any, cost: Cost) -> None:
    container = _container(document, target)
    if target.kind == "string":
        put(
            container, target.attribute, None if op == "remove" else to_string(value, target.label)
        )
    elif target.kind == "boolean":
        coerced = None if op == "remove" else to_boolean(value, target.label)
        put(container, target.attribute, coerced)
    elif target.kind == "complex":
        apply_complex(container, op, target, value)
    elif target.kind == "multi":
        apply_multi(container, op, target, value, cost)
    elif target.kind == "manager":
        apply_manager(container, op, target, value)
    elif target.kind == "undeclared":
        apply_undeclared(document, op, target, value, cost)
    else:
        _apply_extension(document, op, value, cost)


def _apply_extension(document: dict[str, Any], op: str, value: Any, cost: Cost) -> None:
    """The whole enterprise extension object: add and replace merge its attributes."""
    if op == "remove" or value is None or value == "":
        document.pop(ENTERPRISE_SCHEMA, None)
        return
    if not isinstance(value, Mapping):
        raise invalid_value(f"{ENTERPRISE_SCHEMA} must be an object")
    for key, sub_value in value.items():
        attribute = lookup(ENTERPRISE_KINDS, key) if isinstance(key, str) else None
        if attribute is not None:
            target = Target(key, ENTERPRISE_KINDS[attribute], attribute, extension=True)
            _apply(document, op, target, sub_value, cost)


def _apply_without_path(document: dict[str, Any], op: str, value: Any, cost: Cost) -> None:
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
    cost = Cost(max_values, reject=reject, declared=declared)
    result = copy.deepcopy(dict(document))
    for index, raw in enumerate(operations):
        operation = _operation(raw, index)
        op, path, value = operation["op"], operation["path"], operation["value"]
        if path is None:
            if op == "remove":
                raise no_target(f"Operations[{index}]: remove needs a path")
            _apply_without_path(result, op, value, cost)
        else:
            _apply(result, op, cost.resolve(path), value, cost)
    _tidy(result)
    return result
