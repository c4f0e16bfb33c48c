"""PATCH on a Group, as a change to apply: attributes to set and members to add or remove.

A group may have 100,000 members, so a PATCH is never applied to a member list in memory.
Operations fold into a `GroupEdit` (service/commands.py: ids to add, ids to remove, or "every
current member removed"); the handler then asks the membership rows which of them change
anything.

Entra's default style removes members with the ids in `value`
(`{"op":"Remove","path":"members","value":[{"value":"<id>"}]}`): only those are removed. A
remove of `members` with no value removes every member, as RFC 7644 §3.5.2.2 says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scim2_models import InvalidFilterException, ScimFilter
from scim2_models.path.expressions import CompareOperator, Comparison, LogicalExpr, LogicalOperator

from domain.core_schemas import GROUP_SCHEMA_URN
from service.commands import GroupEdit
from service.errors import ScimError, invalid_value
from service.scim.representation import is_undeclared_urn, undeclared_refused

GROUP_SCHEMA = GROUP_SCHEMA_URN
# Entra adds this schema to groups it creates; it carries nothing we keep.
AD_GROUP_SCHEMA = "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"
def _no_target(detail: str) -> ScimError:
    return ScimError(400, detail, "noTarget")


def members_of(
    value: Any, where: str = "members", limit: int | None = None
) -> dict[str, str | None]:
    """The members of a members value (a list of {"value": id}, one such object, or bare ids),
    each with the `display` the client gave it, if any; at most `limit` of them."""
    if value is None:
        return {}
    items = value if isinstance(value, list) else [value]
    _check_count(len(items), limit)
    found: dict[str, str | None] = {}
    for item in items:
        if isinstance(item, str):
            found.setdefault(item, None)
            continue
        if not isinstance(item, Mapping):
            raise invalid_value(f'{where} must be a list of {{"value": id}} objects')
        keyed = {k.lower(): v for k, v in item.items()}
        member = keyed.get("value")
        if not isinstance(member, str) or not member:
            raise invalid_value(f"every entry of {where} needs a string value (the member's id)")
        display = keyed.get("display")
        found[member] = display if isinstance(display, str) and display else None
    return found


def _check_count(count: int, limit: int | None) -> None:
    if limit is not None and count > limit:
        raise invalid_value(
            f"a PATCH operation (or a POST or PUT body) may name at most {limit} members,"
            f" not {count}"
            " (Settings.max_patch_members); send them in several operations or requests"
        )


def _filter_ids(expression: str) -> set[str]:
    """Ids named by `value eq "id"` terms joined by `or` (members[value eq "a" or value eq "b"])."""
    try:
        node = ScimFilter(expression).ast
    except (InvalidFilterException, ValueError) as e:
        raise ScimError(400, f"invalid members filter: {e}", "invalidPath") from None
    terms = (
        node.terms if isinstance(node, LogicalExpr) and node.op == LogicalOperator.or_ else [node]
    )
    ids: set[str] = set()
    for term in terms:
        if (
            not isinstance(term, Comparison)
            or term.attr_path.attr.lower() != "value"
            or term.op != CompareOperator.eq
            or not isinstance(term.value, str)
        ):
            raise ScimError(
                400, 'members filters select by value: members[value eq "<id>"]', "invalidPath"
            )
        ids.add(term.value)
    return ids


def _string_or_none(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise invalid_value(f"{name} must be a string")
    return value


def _apply_attribute(
    change: GroupEdit,
    op: str,
    name: str,
    value: Any,
    max_members: int | None = None,
    reject: bool = False,
) -> None:
    key = name.lower()
    if is_undeclared_urn(name):
        urn = name.split("[", 1)[0]
        if reject and not any(
            urn.casefold() == d or urn.casefold().startswith(d + ":") for d in change.declared
        ):
            raise undeclared_refused(name.split("[", 1)[0])
        change.extension_ops.append((op, name, value))
    elif key in ("displayname", f"{GROUP_SCHEMA.lower()}:displayname"):
        if op == "remove":
            raise ScimError(400, "displayName is required and cannot be removed", "mutability")
        change.display_name = _string_or_none(value, "displayName")
    elif key in ("externalid", f"{GROUP_SCHEMA.lower()}:externalid"):
        change.external_id = None if op == "remove" else _string_or_none(value, "externalId")
    elif key in ("members", f"{GROUP_SCHEMA.lower()}:members"):
        members = members_of(value, limit=max_members)
        ids = set(members)
        if op != "remove":
            change.displays.update({m: d for m, d in members.items() if d})
        if op == "add":
            change.add(ids)
        elif op == "replace":
            change.replace_members(ids)
        elif value is None:
            change.replace_members(set())
        else:
            change.remove(ids)
    elif key in ("id", "meta", "schemas") or key.startswith("meta."):
        raise ScimError(400, f"{name} is read-only", "mutability")
    else:
        raise ScimError(400, f"Groups have no attribute {name!r}", "invalidPath")


def fold_operations(
    operations: list[dict[str, Any]],
    max_members: int | None = None,
    max_values: int | None = None,
    *,
    reject: bool = False,
    declared: dict[str, Any] | None = None,
) -> GroupEdit:
    """All-or-nothing: any invalid operation raises before anything is applied.

    `max_members` (Settings.max_patch_members) caps the members one operation names,
    `max_values` the values of an extension attribute; `reject`: the tenant rejects
    undeclared extension attributes (400)."""
    change = GroupEdit(max_values=max_values, declared=declared or {})
    for operation in operations:
        op, path, value = operation["op"], operation["path"], operation["value"]
        if path is None:
            if op == "remove":
                raise _no_target("remove needs a path")
            if not isinstance(value, Mapping):
                raise invalid_value(f"{op} without a path needs an object of attributes")
            for name, item in value.items():
                if name.lower() in ("schemas", "id", "meta"):
                    continue
                _apply_attribute(change, op, name, item, max_members, reject)
            continue
        bracket = path.find("[")
        if bracket > 0 and path.endswith("]") and not is_undeclared_urn(path):
            if path[:bracket].strip().lower() != "members":
                raise ScimError(400, f"unsupported path {path!r}", "invalidPath")
            ids = _filter_ids(path[bracket + 1 : -1])
            _check_count(len(ids), max_members)
            if op != "remove":
                raise ScimError(
                    400, f"{op} on a filtered members path is not supported", "invalidPath"
                )
            change.remove(ids)
            continue
        _apply_attribute(change, op, path, value, max_members, reject)
    return change
