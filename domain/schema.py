"""The canonical user state: which SCIM attributes the domain keeps, and their one spelling.

The service layer turns every SCIM request (POST, PUT, either PATCH style) into a desired state
of this shape. Normalising it first gives "absent" exactly one representation (the key is
missing: never None, "", [] or {}), so comparing desired with current state finds real
changes only, and an unchanged resync from Entra records nothing.

Keys are SCIM attribute names; the enterprise extension lives under "enterprise", except
`manager`, which is a top-level key holding the manager's user id. Any other extension a client
sends (Entra's custom attributes: `urn:…:CustomExtensionName:2.0:User`) lives under its URN, as
an object of its attributes, kept as sent: nothing a client sends is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, cast
from uuid import UUID

from domain.core_schemas import (
    COMMON_ATTRIBUTES,
    ENTERPRISE_USER,
    USER,
    named,
    names,
    sub_names,
)
from domain.core_schemas import ENTERPRISE_SCHEMA_URN as ENTERPRISE_SCHEMA_URN
from domain.core_schemas import GROUP_SCHEMA_URN as GROUP_SCHEMA_URN
from domain.core_schemas import USER_SCHEMA_URN as USER_SCHEMA_URN
from domain.errors import InvalidValue

_TEXT = ("string", "reference")

USER_NAME = "userName"
ACTIVE = "active"
NAME = "name"
EMAILS = "emails"
MANAGER = "manager"
ENTERPRISE = "enterprise"

# The attribute sets below are read off the one definition (domain/core_schemas.py).
_USER_ATTRIBUTES = USER["attributes"]
NAME_SUB_ATTRIBUTES = sub_names(named(USER, NAME))
# Sub-attributes of an address (RFC 7643 §4.1.2), `primary` aside.
ADDRESS_SUB_ATTRIBUTES = sub_names(named(USER, "addresses"), skip=("primary",))
# Single-valued strings (and references) besides userName, externalId first (RFC 7643 §3.1).
USER_STRING_ATTRIBUTES = (
    "externalId",
    *(n for n in names(_USER_ATTRIBUTES, kinds=_TEXT, multi=False) if n != USER_NAME),
)
# Multi-valued complex attributes a client writes (`groups` is read-only).
USER_MULTI_VALUED_ATTRIBUTES = names(
    _USER_ATTRIBUTES, kinds=("complex",), multi=True, writable=True
)
USER_ENTERPRISE_ATTRIBUTES = names(ENTERPRISE_USER["attributes"], kinds=_TEXT, multi=False)
# Sub-attributes of each multi-valued one (RFC 7643 §4.1.2), and of the enterprise manager.
USER_MULTI_VALUED_SUB_ATTRIBUTES = {
    attribute: sub_names(named(USER, attribute)) for attribute in USER_MULTI_VALUED_ATTRIBUTES
}
MANAGER_SUB_ATTRIBUTES = sub_names(named(ENTERPRISE_USER, MANAGER))
# Attributes a client never writes (mutability readOnly): the common id and meta, and groups.
USER_READ_ONLY_ATTRIBUTES = (
    *names(COMMON_ATTRIBUTES, writable=False),
    *names(_USER_ATTRIBUTES, writable=False),
)
# How enterprise sub-attributes are named in UserAttributesChanged and in InvalidValue.
ENTERPRISE_PREFIX = ENTERPRISE + "."

# Extension schemas other than the enterprise one are keyed by their URN (RFC 8141 in the
# printable ASCII SCIM uses), their attributes by SCIM attribute names (RFC 7643 §2.1).
_EXTENSION_URN = re.compile(r"urn:[A-Za-z0-9][A-Za-z0-9-]{0,31}(?::[!-~]+)+")
_ATTRIBUTE_NAME = re.compile(r"\$?[A-Za-z][A-Za-z0-9_-]*")
# How an extension attribute is named in events and in the provisioning log: its full name.
EXTENSION_SEPARATOR = ":"


def is_extension_urn(key: str) -> bool:
    """Whether a state key is an extension schema's URN (the enterprise one is "enterprise")."""
    return key[:4].casefold() == "urn:"


def extension_attribute_name(urn: str, attribute: str) -> str:
    """`urn:…:2.0:User` + `CustomAttribute` -> `urn:…:2.0:User:CustomAttribute`."""
    return urn + EXTENSION_SEPARATOR + attribute


def split_extension_attribute(name: str) -> tuple[str, str]:
    """The inverse of extension_attribute_name (attribute names hold no colon)."""
    urn, _, attribute = name.rpartition(EXTENSION_SEPARATOR)
    return urn, attribute


def normalise_extension(value: object, urn: str) -> dict[str, Any] | None:
    """An extension object: attribute name -> JSON value, empty values dropped, keys sorted.

    Values are kept as sent (a string, a number, a boolean, an object, a list of them); the
    service layer has already bounded their size (string length, values per attribute,
    nesting)."""
    if _EXTENSION_URN.fullmatch(urn) is None:
        raise InvalidValue(urn, f"{urn[:200]!r} is not an extension schema URN")
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidValue(urn, f"{urn} must be an object of attributes")
    attributes: dict[str, Any] = {}
    for key in value:
        if not isinstance(key, str) or _ATTRIBUTE_NAME.fullmatch(key) is None:
            raise InvalidValue(urn, f"{urn}: {str(key)[:200]!r} is not an attribute name")
        sub_value = value[key]
        if _empty(sub_value):
            continue
        attributes[key] = sub_value
    return dict(sorted(attributes.items())) or None


def respell_extensions(current: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` with its extension URNs and attribute names spelt as in `current` where they
    match case-insensitively (SCIM names are case-insensitive): a resync in another case is
    no change. Keys stay sorted."""
    urns = {key.casefold(): key for key in current if is_extension_urn(key)}
    if not urns:
        return new
    out: dict[str, Any] = {}
    for key, value in new.items():
        urn = urns.get(key.casefold()) if is_extension_urn(key) else None
        if urn is None:
            out[key] = value
            continue
        names = {name.casefold(): name for name in current[urn]}
        respelt = ((names.get(k.casefold(), k), v) for k, v in value.items())
        out[urn] = dict(sorted(respelt, key=lambda item: item[0]))
    return dict(sorted(out.items()))


def extension_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Changed extension attributes by full name (`urn:…:User:CustomAttribute`), None for
    cleared: what UserAttributesChanged (and GroupAttributesChanged) record of extensions."""
    changed: dict[str, Any] = {}
    for urn in {k for k in old if is_extension_urn(k)} | {k for k in new if is_extension_urn(k)}:
        old_attributes, new_attributes = old.get(urn, {}), new.get(urn, {})
        for attribute in set(old_attributes) | set(new_attributes):
            if new_attributes.get(attribute) != old_attributes.get(attribute):
                changed[extension_attribute_name(urn, attribute)] = new_attributes.get(attribute)
    return dict(sorted(changed.items()))


def _empty(value: object) -> bool:
    return value is None or value == "" or value == [] or value == {}


def normalise_user(state: Mapping[str, Any]) -> dict[str, Any]:
    """Return the canonical form of a user state, or raise InvalidValue.

    Unknown keys are dropped (an extension URN is not unknown); empty values are dropped;
    `active` may be absent (unassigned); keys are sorted.
    Normalising a canonical state returns an equal state.
    """
    canonical: dict[str, Any] = {}

    user_name = state.get(USER_NAME)
    if not isinstance(user_name, str) or not user_name.strip():
        raise InvalidValue(USER_NAME, "userName is required and must be a non-empty string")
    canonical[USER_NAME] = user_name

    active = state.get(ACTIVE)
    if active is not None:
        if not isinstance(active, bool):
            raise InvalidValue(ACTIVE, "active must be a boolean")
        canonical[ACTIVE] = active

    # (Absent attributes, most of them, are skipped here rather than by the helpers.)
    for attribute in USER_STRING_ATTRIBUTES:
        value = state.get(attribute)
        if value is not None and value != "":
            canonical[attribute] = _string(value, attribute)

    name = _sub_attributes(state.get(NAME), NAME, _NAME_SORTED)
    if name:
        canonical[NAME] = name
    enterprise = _sub_attributes(state.get(ENTERPRISE), ENTERPRISE, _ENTERPRISE_SORTED)
    if enterprise:
        canonical[ENTERPRISE] = enterprise

    for attribute in USER_MULTI_VALUED_ATTRIBUTES:
        value = state.get(attribute)
        if value is not None:
            values = _multi_valued(value, attribute)
            if values:
                canonical[attribute] = values

    manager = _string(state.get(MANAGER), MANAGER)
    if manager is not None:
        canonical[MANAGER] = resource_id(manager, MANAGER)

    for key, value in state.items():
        if is_extension_urn(key):
            extension = normalise_extension(value, key)
            if extension:
                canonical[key] = extension

    return dict(sorted(canonical.items()))


def resource_id(value: object, attribute: str) -> str:
    """The canonical spelling of an id this service issued (lower-case hyphenated UUID)."""
    if not isinstance(value, str):
        raise InvalidValue(attribute, f"{attribute} must be a resource id string")
    try:
        return str(UUID(value))
    except ValueError:
        detail = f"{attribute} is not a resource id: {value!r}"
        raise InvalidValue(attribute, detail) from None


def _string(value: object, attribute: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidValue(attribute, f"{attribute} must be a string")
    return value


_NAME_SORTED = tuple(sorted(NAME_SUB_ATTRIBUTES))
_ENTERPRISE_SORTED = tuple(sorted(USER_ENTERPRISE_ATTRIBUTES))


def _is_mapping(value: object) -> bool:
    return type(value) is dict or isinstance(value, Mapping)  # (states are made of dicts)


def _sub_attributes(value: object, attribute: str, known: tuple[str, ...]) -> dict[str, str] | None:
    """`known`: sorted."""
    if value is None:
        return None
    if not _is_mapping(value):
        raise InvalidValue(attribute, f"{attribute} must be an object")
    get = cast(Mapping[str, Any], value).get
    subs: dict[str, str] = {}
    for key in known:
        sub_value = get(key)
        if sub_value is not None and sub_value != "":
            if not isinstance(sub_value, str):
                raise InvalidValue(f"{attribute}.{key}", f"{attribute}.{key} must be a string")
            subs[key] = sub_value
    return subs or None


def _multi_valued(value: object, attribute: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise InvalidValue(attribute, f"{attribute} must be a list of objects")
    items: list[dict[str, Any]] = []
    seen: set[tuple[tuple[str, str | bool], ...]] = set()
    for raw in value:
        if not _is_mapping(raw):
            raise InvalidValue(attribute, f"{attribute} must be a list of objects")
        for key in raw:
            if not isinstance(key, str):
                raise InvalidValue(attribute, f"{attribute} sub-attribute names must be strings")
        item = {}
        for key in sorted(raw):
            sub_value = raw[key]
            if sub_value is None or sub_value == "":
                continue
            if not isinstance(sub_value, (str, bool)):
                raise InvalidValue(attribute, f"{attribute} values must be strings or booleans")
            item[key] = sub_value
        # SCIM order is the client's, so it is kept; exact repeats say nothing new. Items are
        # built with sorted keys, so equal items have equal tuples: one hash each, not a
        # comparison with every earlier item.
        key = tuple(item.items())
        if item and key not in seen:
            seen.add(key)
            items.append(item)
    if sum(1 for item in items if item.get("primary") is True) > 1:
        raise InvalidValue(attribute, f"at most one of {attribute} may be primary")
    return items
