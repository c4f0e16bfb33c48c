"""SCIM User JSON to and from the canonical user state of domain/schema.py (pure, no I/O).

Input is read the way Entra writes it: attribute names in any case, explicit nulls for absent
attributes, `active` as the string "False", the manager as an object, a bare id or a list of one
object. Read-only and unknown attributes are ignored. Output is always the canonical spelling.

The *document* (`user_document`) is the SCIM JSON of a user's writable attributes: the shape a
PUT body has, and the one PATCH operations are applied to (service/scim/patch.py). The coercion
helpers below are shared with patch.py so both read values the same way.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

from domain.schema import (
    ACTIVE,
    ENTERPRISE,
    ENTERPRISE_SCHEMA_URN,
    MANAGER,
    NAME,
    NAME_SUB_ATTRIBUTES,
    USER_ENTERPRISE_ATTRIBUTES,
    USER_MULTI_VALUED_ATTRIBUTES,
    USER_MULTI_VALUED_SUB_ATTRIBUTES,
    USER_NAME,
    USER_READ_ONLY_ATTRIBUTES,
    USER_SCHEMA_URN,
    USER_STRING_ATTRIBUTES,
    is_extension_urn,
    split_extension_attribute,
)
from domain.schema import MANAGER_SUB_ATTRIBUTES as DOMAIN_MANAGER_SUB_ATTRIBUTES
from service.errors import ScimError, invalid_value
from service.scim.selection import select_attributes as select_attributes

USER_SCHEMA = USER_SCHEMA_URN
ENTERPRISE_SCHEMA = ENTERPRISE_SCHEMA_URN

# Attributes a client never writes: ignored in bodies, refused as PATCH targets.
READ_ONLY_ATTRIBUTES = (*USER_READ_ONLY_ATTRIBUTES, "schemas")
CORE_STRING_ATTRIBUTES = (USER_NAME, *USER_STRING_ATTRIBUTES)

# Sub-attributes of the multi-valued attributes (RFC 7643 §4.1.2); others are ignored.
MULTI_VALUED_SUB_ATTRIBUTES = USER_MULTI_VALUED_SUB_ATTRIBUTES
# The enterprise manager (RFC 7643 §4.3): only `value` is kept; `$ref` and `displayName` are
# derived from it.
MANAGER_SUB_ATTRIBUTES = DOMAIN_MANAGER_SUB_ATTRIBUTES
PRIMARY = "primary"

_BOOLEAN_STRINGS = {"true": True, "false": False}


def lookup(names: Iterable[str], name: str) -> str | None:
    """The canonical spelling of `name` among `names` (SCIM names are case-insensitive)."""
    folded = name.casefold()
    if type(names) is tuple:  # the schema's own name lists: one dict lookup
        return _by_folded(names).get(folded)
    return next((known for known in names if known.casefold() == folded), None)


@functools.lru_cache(maxsize=256)
def _by_folded(names: tuple[str, ...]) -> dict[str, str]:
    """Case-folded name -> the first of `names` so spelled (read only: it is shared)."""
    found: dict[str, str] = {}
    for known in names:
        found.setdefault(known.casefold(), known)
    return found


def to_string(value: object, attribute: str) -> str | None:
    """A string attribute value; None and "" mean absent."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise invalid_value(f"{attribute} must be a string")
    return value


def to_boolean(value: object, attribute: str) -> bool | None:
    """A boolean; Entra also sends "True"/"False" (any case). None and "" mean absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().casefold() in _BOOLEAN_STRINGS:
        return _BOOLEAN_STRINGS[value.strip().casefold()]
    raise invalid_value(f"{attribute} must be a boolean, not {value!r}")


def _is_mapping(value: object) -> bool:
    return type(value) is dict or isinstance(value, Mapping)  # (a JSON body's are dicts)


def to_sub_attributes(
    value: object, attribute: str, known: tuple[str, ...]
) -> dict[str, str] | None:
    """A complex attribute of string sub-attributes (name, the enterprise strings)."""
    if value is None or value == "":
        return None
    if not _is_mapping(value):
        raise invalid_value(f"{attribute} must be an object")
    spelling = _by_folded(known)
    subs: dict[str, str] = {}
    for key, sub_value in cast(Mapping[Any, Any], value).items():
        sub = spelling.get(key.casefold()) if isinstance(key, str) else None
        if sub is None:
            continue
        if sub_value is None or sub_value == "":
            subs.pop(sub, None)
        else:
            subs[sub] = _text(sub_value, attribute, sub)
    return subs or None


def _text(value: object, attribute: str, sub: str) -> str:
    """to_string of a value known not to be absent, named `attribute.sub` in its error."""
    if not isinstance(value, str):
        raise invalid_value(f"{attribute}.{sub} must be a string")
    return value


def to_item_value(value: object, attribute: str, sub: str) -> str | bool | None:
    """One sub-attribute value of a multi-valued item: `primary` is a boolean, others strings."""
    if sub == PRIMARY:
        return to_boolean(value, f"{attribute}.{sub}")
    return to_string(value, f"{attribute}.{sub}")


def to_item(value: object, attribute: str) -> dict[str, Any]:
    """One item of a multi-valued attribute, sub-attributes in canonical spelling."""
    if not _is_mapping(value):
        raise invalid_value(f"{attribute} must be a list of objects")
    spelling = _by_folded(MULTI_VALUED_SUB_ATTRIBUTES[attribute])
    item: dict[str, Any] = {}
    for key, sub_value in cast(Mapping[Any, Any], value).items():
        sub = spelling.get(key.casefold()) if isinstance(key, str) else None
        if sub is None:
            continue
        if sub_value is None or sub_value == "":
            item.pop(sub, None)
        elif sub == PRIMARY:
            item[sub] = to_boolean(sub_value, f"{attribute}.{sub}")
        else:
            item[sub] = _text(sub_value, attribute, sub)
    return item


def check_multi_values(count: int, attribute: str, max_values: int | None) -> None:
    """400 invalidValue past Settings.max_multi_values (checked before any value is read)."""
    if max_values is not None and count > max_values:
        raise invalid_value(
            f"{attribute} may hold at most {max_values} values, not {count}"
            " (SCIMLEDGER_MAX_MULTI_VALUES)"
        )


def to_items(
    value: object, attribute: str, max_values: int | None = None
) -> list[dict[str, Any]] | None:
    """A multi-valued attribute: a list of objects; None means absent; empty items dropped."""
    if value is None or value == "":
        return None
    if not isinstance(value, list | tuple):
        raise invalid_value(f"{attribute} must be a list of objects")
    check_multi_values(len(value), attribute, max_values)
    items = [to_item(raw, attribute) for raw in value]
    return [item for item in items if item] or None


def to_manager(value: object) -> str | None:
    """The manager's id from any form Entra sends: {"value": id, "$ref": ...}, a bare id, or a
    list of one such object. Empty forms clear it. The id itself is checked by the domain."""
    if value is None or value == "" or value == [] or value == {}:
        return None
    if isinstance(value, list | tuple):
        if len(value) != 1:
            raise invalid_value(f"{MANAGER} must be a single value")
        return to_manager(value[0])
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        key = lookup((k for k in value if isinstance(k, str)), "value")
        return None if key is None else to_string(value[key], f"{MANAGER}.value")
    raise invalid_value(f"{MANAGER} must be an object with a value, or an id")


def _mapping(body: object) -> Mapping[str, Any]:
    if not _is_mapping(body):
        raise ScimError(400, "the request body must be a JSON object", "invalidSyntax")
    return cast(Mapping[str, Any], body)


def _keyed(body: Mapping[str, Any]) -> dict[str, Any]:
    """Body items by case-folded name (the last spelling wins, as in a JSON object)."""
    return {key.casefold(): value for key, value in body.items() if isinstance(key, str)}


# Schemas of SCIM itself: never a client's extension.
_SCIM_PREFIXES = ("urn:ietf:params:scim:schemas:core:", "urn:ietf:params:scim:api:")


def is_undeclared_urn(urn: str) -> bool:
    """Whether a URN can name a client's extension (not SCIM's own core or API schemas)."""
    return is_extension_urn(urn) and not urn.casefold().startswith(_SCIM_PREFIXES)


def undeclared_refused(urn: str) -> ScimError:
    """400 for an extension the tenant has not declared, under `--undeclared reject`."""
    return invalid_value(
        f"{urn} is not a schema this tenant declares, and the tenant rejects undeclared"
        " extension attributes: declare it, or keep them as sent"
        " (scimledger tenants set TENANT --undeclared keep)"
    )


def extensions_from_scim(
    body: Mapping[str, Any],
    known: Iterable[str],
    max_values: int | None = None,
    *,
    reject: bool = False,
    declared: Iterable[str] = (),
) -> dict[str, dict[str, Any]]:
    """The undeclared extensions of a body: URN -> {attribute: value}, as sent.

    A key is an extension URN with an object of attributes (`"urn:…:2.0:User": {"A": "x"}`),
    or a URN-qualified attribute with its value (`"urn:…:2.0:User:A": "x"`). URNs and
    attribute names are matched case-insensitively (the first spelling is kept); `known` are
    the schemas read elsewhere (core, enterprise). A list value is capped at `max_values`.
    `reject` (the tenant's `--undeclared reject`): 400 naming the first such URN.
    """
    skipped = {urn.casefold() for urn in known}
    accepted = frozenset(declared)  # case-folded URNs the tenant declares
    found: dict[str, dict[str, Any]] = {}
    # Case-folded URN, and (URN, attribute), -> the spelling kept: one lookup per key.
    spelling: dict[str, str] = {}
    names: dict[tuple[str, str], str] = {}
    for key, value in body.items():
        if not isinstance(key, str) or not is_undeclared_urn(key) or key.casefold() in skipped:
            continue
        if isinstance(value, Mapping):
            urn, attributes = key, value
        else:
            urn, attribute = split_extension_attribute(key)
            if urn.casefold() in skipped or not attribute:
                continue
            attributes = {attribute: value}
        if reject and urn.casefold() not in accepted:
            raise undeclared_refused(urn)
        folded_urn = urn.casefold()
        extension = found.setdefault(spelling.setdefault(folded_urn, urn), {})
        for name, attribute_value in attributes.items():
            if not isinstance(name, str):
                raise invalid_value(f"{urn} attribute names must be strings")
            if isinstance(attribute_value, list):
                check_multi_values(len(attribute_value), f"{urn}:{name}", max_values)
            extension[names.setdefault((folded_urn, name.casefold()), name)] = attribute_value
    return found


_CORE_STRINGS_FOLDED = tuple((a, a.casefold()) for a in CORE_STRING_ATTRIBUTES)
_MULTI_VALUED_FOLDED = tuple((a, a.casefold()) for a in USER_MULTI_VALUED_ATTRIBUTES)


def user_from_scim(
    body: Mapping[str, Any],
    max_values: int | None = None,
    *,
    reject: bool = False,
    declared: Iterable[str] = (),
) -> dict[str, Any]:
    """A POST/PUT body (or a patched document) -> a desired state in domain/schema.py shape.

    Absent attributes are left out; the domain normalises the result (and requires userName).
    `max_values` (Settings.max_multi_values) caps each multi-valued attribute: 400 invalidValue.
    Undeclared extensions are kept under their URN, or refused with `reject`.
    """
    fields = _keyed(_mapping(body))
    state: dict[str, Any] = {}

    # (Absent attributes, most of them, are skipped here rather than by the helpers.)
    for attribute, folded in _CORE_STRINGS_FOLDED:
        value = fields.get(folded)
        if value is not None and value != "":
            state[attribute] = to_string(value, attribute)
    active = to_boolean(fields.get(ACTIVE.casefold()), ACTIVE)
    if active is not None:
        state[ACTIVE] = active
    name = to_sub_attributes(fields.get(NAME.casefold()), NAME, NAME_SUB_ATTRIBUTES)
    if name:
        state[NAME] = name
    for attribute, folded in _MULTI_VALUED_FOLDED:
        value = fields.get(folded)
        if value is not None and value != "":
            items = to_items(value, attribute, max_values)
            if items:
                state[attribute] = items

    extension = fields.get(ENTERPRISE_SCHEMA.casefold())
    if extension is not None and not _is_mapping(extension):
        raise invalid_value(f"{ENTERPRISE_SCHEMA} must be an object")
    extension_fields = _keyed(extension or {})
    enterprise = to_sub_attributes(extension_fields, ENTERPRISE_SCHEMA, USER_ENTERPRISE_ATTRIBUTES)
    if enterprise:
        state[ENTERPRISE] = enterprise
    # Entra's create body carries a top-level "manager": null; the extension's one wins.
    if MANAGER.casefold() in extension_fields:
        manager = to_manager(extension_fields[MANAGER.casefold()])
    else:
        manager = to_manager(fields.get(MANAGER.casefold()))
    if manager is not None:
        state[MANAGER] = manager
    extensions = extensions_from_scim(
        body, (USER_SCHEMA, ENTERPRISE_SCHEMA), max_values, reject=reject, declared=declared
    )
    state.update(extensions)
    return state


def json_copy(value: Any) -> Any:
    """A deep copy of JSON-shaped data (dicts, lists, scalars): what copy.deepcopy makes of
    it, at a third of the cost (a reply copies the state it shows)."""
    if type(value) is dict:
        return {k: json_copy(v) for k, v in value.items()}
    if type(value) is list:
        return [json_copy(v) for v in value]
    if isinstance(value, dict | list | tuple):
        return copy.deepcopy(value)
    return value


def user_document(state: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical state -> the SCIM JSON of the user's attributes (no id, no meta).

    user_from_scim(user_document(state)) normalises back to `state`.
    """
    extension: dict[str, Any] = dict(json_copy(state.get(ENTERPRISE) or {}))
    if state.get(MANAGER):
        extension[MANAGER] = {"value": state[MANAGER]}
    others = [key for key in state if is_extension_urn(key)]
    document: dict[str, Any] = {
        "schemas": [USER_SCHEMA, *([ENTERPRISE_SCHEMA] if extension else []), *others]
    }
    order = (
        USER_NAME,
        *USER_STRING_ATTRIBUTES,
        NAME,
        ACTIVE,
        *USER_MULTI_VALUED_ATTRIBUTES,
    )
    for attribute in order:
        if attribute in state and state[attribute] is not None:
            document[attribute] = json_copy(state[attribute])
    if extension:
        document[ENTERPRISE_SCHEMA] = extension
    for urn in others:
        document[urn] = json_copy(state[urn])
    return document


def scim_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with Z, as meta.created and meta.lastModified carry it."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def user_resource(
    state: Mapping[str, Any],
    *,
    user_id: str,
    version: int,
    created: datetime,
    last_modified: datetime,
    location: str,
    groups: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The full User resource: the document plus id, meta and (when given) groups."""
    document = user_document(state)
    resource: dict[str, Any] = {"schemas": document.pop("schemas"), "id": user_id, **document}
    manager = resource.get(ENTERPRISE_SCHEMA, {}).get(MANAGER)
    if manager and location.endswith("/" + user_id):
        manager["$ref"] = location.removesuffix(user_id) + manager["value"]
    if groups is not None:
        resource["groups"] = groups
    created_at = scim_timestamp(created)
    resource["meta"] = {
        "resourceType": "User",
        "created": created_at,
        # (A user just created: the same moment, written once.)
        "lastModified": created_at if last_modified == created else scim_timestamp(last_modified),
        "location": location,
        "version": f'W/"{version}"',
    }
    return resource
