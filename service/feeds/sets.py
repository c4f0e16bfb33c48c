"""Security Event Tokens (RFC 8417) for SCIM changes, as RFC 9967 (SCIM events) shapes them.

Pure: no I/O. `changes_of` turns the domain events one SCIM request appended (one transaction)
into one `Change` per resource; `claims` turns a Change into the claims of one SET for one
stream. The producer (service/feeds/producer.py) signs and stores them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from domain.group import Group
from domain.schema import (
    ACTIVE,
    ENTERPRISE,
    ENTERPRISE_PREFIX,
    MANAGER,
    NAME,
    USER_MULTI_VALUED_ATTRIBUTES,
    USER_NAME,
    USER_STRING_ATTRIBUTES,
    is_extension_urn,
)
from domain.user import User
from service.scim.representation import user_document

PREFIX = "urn:ietf:params:scim:event:"
# RFC 9967 §7.4 (initial registry): the URIs we produce.
FEED_ADD = PREFIX + "feed:add"  # §2.3.1
FEED_REMOVE = PREFIX + "feed:remove"  # §2.3.2
CREATE = PREFIX + "prov:create"  # §2.4.1, + ":notice" | ":full"
PATCH = PREFIX + "prov:patch"  # §2.4.2
PUT = PREFIX + "prov:put"  # §2.4.3
DELETE = PREFIX + "prov:delete"  # §2.4.4
ACTIVATE = PREFIX + "prov:activate"  # §2.4.5
DEACTIVATE = PREFIX + "prov:deactivate"  # §2.4.6

EVENT_URIS: tuple[str, ...] = (
    FEED_ADD,
    FEED_REMOVE,
    CREATE + ":notice",
    CREATE + ":full",
    PATCH + ":notice",
    PATCH + ":full",
    PUT + ":notice",
    PUT + ":full",
    DELETE,
    ACTIVATE,
    DEACTIVATE,
)
# Names an operator may give to `feeds create --events` (the URI without the prefix, and
# without the form: the stream's --full chooses it).
EVENT_NAMES: tuple[str, ...] = (
    "feed:add",
    "feed:remove",
    "prov:create",
    "prov:patch",
    "prov:put",
    "prov:delete",
    "prov:activate",
    "prov:deactivate",
)

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE_SCHEMA = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"

# Domain event -> the SCIM attribute path it changes (RFC 7644 §3.5.2 path syntax, as
# RFC 9967 §2.2 `attributes` asks).
_USER_ATTRIBUTE = {
    "UserNameChanged": "userName",
    "NameChanged": "name",
    "EmailChanged": "emails",
    "ManagerChanged": ENTERPRISE_SCHEMA + ":manager",
    "UserDeactivated": "active",
    "UserReactivated": "active",
    "UserActiveUnassigned": "active",
}
_GROUP_ATTRIBUTE = {
    "GroupRenamed": "displayName",
    "GroupExternalIdChanged": "externalId",
    "GroupMembershipChanged": "members",
}


def attribute_path(name: str) -> str:
    """A canonical attribute name of domain/schema.py as a SCIM path (enterprise ones by URN)."""
    if name.startswith(ENTERPRISE_PREFIX):
        return ENTERPRISE_SCHEMA + ":" + name.removeprefix(ENTERPRISE_PREFIX)
    return name


@dataclass(slots=True)
class Change:
    """What one SCIM request did to one resource: the subject and payload of one SET."""

    resource_type: str  # "User" or "Group"
    resource_id: UUID
    version: int = 0
    created: bool = False
    deleted: bool = False
    activated: bool = False
    deactivated: bool = False
    attributes: list[str] = field(default_factory=list)
    # For `prov:patch:full`: the operations as applied (RFC 9967 §2.4.2: data is a PatchOp).
    operations: list[dict[str, Any]] = field(default_factory=list)
    added: list[str] = field(default_factory=list)  # group members
    removed: list[str] = field(default_factory=list)
    external_id: str | None = None
    # The resource after the change (SCIM JSON, with id): `data` of create/put in full form.
    data: dict[str, Any] | None = None
    # A created resource's events in this transaction (the creation first): its state after
    # the transaction, made only when a SET needs it (see `resource`).
    history: list[Any] = field(default_factory=list)

    @property
    def uri(self) -> str:
        """RFC 9967 §2.1: `uri` is the path relative to the SCIM base URI."""
        return f"/{self.resource_type}s/{self.resource_id}"

    def note(self, attribute: str, operation: dict[str, Any] | None = None) -> None:
        if attribute not in self.attributes:
            self.attributes.append(attribute)
        if operation is not None:
            self.operations.append(operation)


def _set_or_remove(path: str, value: Any) -> dict[str, Any]:
    if value is None or value == "" or value == [] or value == {}:
        return {"op": "remove", "path": path}
    return {"op": "replace", "path": path, "value": value}


def _resource_type(event: Any) -> str | None:
    if isinstance(event, User.Event):
        return "User"
    return "Group" if isinstance(event, Group.Event) else None


_RESOURCE_TYPES: dict[type, str | None] = {}


def changes_of(events: Iterable[Any]) -> list[Change]:
    """One Change per resource, in the order the request first touched each, from its decoded
    domain events (a whole transaction; other aggregates' events are skipped)."""
    changes: dict[UUID, Change] = {}
    for event in events:
        kind = type(event).__name__
        fields: Any = event  # event classes made by @event have no static fields
        resource_type = _RESOURCE_TYPES.get(type(event), "")
        if resource_type == "":  # once per event class: the aggregates' Event classes are ABCs
            resource_type = _RESOURCE_TYPES[type(event)] = _resource_type(event)
        if resource_type is None:
            continue
        change = changes.get(event.originator_id)
        if change is None:
            change = changes[event.originator_id] = Change(resource_type, event.originator_id)
        change.version = event.originator_version
        if change.history:
            change.history.append(event)
        if kind == "UserProvisioned":
            change.created = True
            change.external_id = fields.attributes.get("externalId")
            change.history = [event]
        elif kind == "GroupCreated":
            change.created = True
            change.external_id = fields.external_id
            change.history = [event]
        elif kind in ("UserDeprovisioned", "GroupDeleted"):
            change.deleted = True
        elif kind == "UserDeactivated":
            change.deactivated = True
            change.note("active", {"op": "replace", "path": "active", "value": False})
        elif kind == "UserReactivated":
            change.activated = True
            change.note("active", {"op": "replace", "path": "active", "value": True})
        elif kind == "UserAttributesChanged":
            for name, value in fields.changed.items():
                path = attribute_path(name)
                change.note(path, _set_or_remove(path, value))
                if name == "externalId":
                    change.external_id = value
        elif kind == "GroupAttributesChanged":  # extension attributes, by full URN name
            for name, value in fields.changed.items():
                change.note(name, _set_or_remove(name, value))
        elif kind == "GroupMembershipChanged":
            change.note("members")
            change.added.extend(fields.added)
            change.removed.extend(fields.removed)
            if fields.added:
                change.operations.append(
                    {
                        "op": "add",
                        "path": "members",
                        "value": [{"value": m, "$ref": f"/Users/{m}"} for m in fields.added],
                    }
                )
            for member in fields.removed:
                change.operations.append({"op": "remove", "path": f'members[value eq "{member}"]'})
        elif kind == "GroupExternalIdChanged":
            change.external_id = fields.external_id
            change.note("externalId", _set_or_remove("externalId", fields.external_id))
        elif kind == "GroupRenamed":
            change.note("displayName", _set_or_remove("displayName", fields.display_name))
        else:
            known = _USER_ATTRIBUTE.get(kind)
            if known is None:  # an event of a later kind: named by its fields
                for field_name in sorted(getattr(event, "__dict__", {})):
                    if not field_name.startswith(("originator", "timestamp")):
                        change.note(attribute_path(field_name))
                continue
            path = known
            value = next(
                (
                    getattr(event, f)
                    for f in ("user_name", "name", "emails", "manager")
                    if hasattr(event, f)
                ),
                None,
            )
            if kind == "ManagerChanged" and value is not None:
                value = {"value": value}
            if kind == "UserActiveUnassigned":
                change.note(path, {"op": "remove", "path": path})
            else:
                change.note(path, _set_or_remove(path, value))
    return list(changes.values())


def resource(change: Change) -> dict[str, Any] | None:
    """`data` of create/put in full form: the resource as the provider holds it after the
    transaction (RFC 9967 §2.4.1), with what later events of the same request set (extension
    attributes sent with a create come as a UserAttributesChanged after the UserProvisioned;
    a group's members as a GroupMembershipChanged)."""
    if change.data is None and change.history:
        change.data = replayed(change.resource_id, change.history)
    return change.data


def replayed(resource_id: UUID, events: Iterable[Any]) -> dict[str, Any] | None:
    """The SCIM JSON of a User or Group after these of its events (from its creation)."""
    events = list(events)
    first: Any = events[0] if events else None
    if len(events) == 1 and type(first).__name__ == "UserProvisioned":
        return user_data(resource_id, {"userName": first.user_name, **first.attributes})
    aggregate: Any = None
    members: dict[str, str | None] = {}
    for event in events:
        aggregate = event.mutate(aggregate)
        if type(event).__name__ == "GroupMembershipChanged":
            note_members(members, event)
    if isinstance(aggregate, User):
        return user_data(resource_id, aggregate.state_view)
    if isinstance(aggregate, Group):
        return group_data(
            resource_id,
            aggregate.display_name,
            aggregate.external_id,
            aggregate.extensions,
            members,
        )
    return None


def note_members(members: dict[str, str | None], event: Any) -> None:
    """Apply one GroupMembershipChanged to `members` (id -> display)."""
    displays = getattr(event, "displays", None) or {}
    for member in event.added:
        members[member] = displays.get(member, members.get(member))
    for member in event.removed:
        members.pop(member, None)


_CREATED_ORDER = {
    a: i
    for i, a in enumerate(
        (USER_NAME, *USER_STRING_ATTRIBUTES, NAME, ACTIVE, *USER_MULTI_VALUED_ATTRIBUTES)
    )
}


def created_names(change: Change) -> list[str]:
    """`attributes` of prov:create:notice. A user created by one event (the common case, and
    every event of a catch-up) is named from its state, in `user_document`'s order, without
    building the document (tests/test_feeds_perf.py checks the two agree)."""
    first: Any = change.history[0] if len(change.history) == 1 else None
    if change.data is None and type(first).__name__ == "UserProvisioned":
        # The names depend only on the attributes' names, which are unset (None), the
        # enterprise ones' names and whether a manager is set: a catch-up's users share a
        # few such shapes, each named once.
        attributes = first.attributes
        shape = (
            first.user_name is None,
            tuple(attributes),
            tuple(a for a, v in attributes.items() if v is None),
            tuple(attributes.get(ENTERPRISE) or ()),
            not attributes.get(MANAGER),
        )
        names = _NAMED.get(shape)
        if names is None:
            if len(_NAMED) >= 1024:
                _NAMED.clear()
            names = _NAMED[shape] = _created_names({USER_NAME: first.user_name, **attributes})
        return list(names)
    return create_attributes(resource(change) or {})


def _created_names(state: Mapping[str, Any]) -> list[str]:
    """The set attributes of `user_document`'s order, by a walk of the (few) set ones."""
    names = ["id"]
    names += sorted(
        (a for a, v in state.items() if v is not None and a in _CREATED_ORDER),
        key=_CREATED_ORDER.__getitem__,
    )
    extension = dict.fromkeys(state.get(ENTERPRISE) or {})
    if state.get(MANAGER):
        extension[MANAGER] = None
    names += [f"{ENTERPRISE_SCHEMA}:{sub}" for sub in extension]
    names += [key for key in state if is_extension_urn(key)]
    return names


_NAMED: dict[tuple[Any, ...], list[str]] = {}


def create_attributes(data: Mapping[str, Any]) -> list[str]:
    """`attributes` of prov:create:notice: the attributes the new resource has (RFC 9967 §2.4.1,
    Figure 5 lists "id" first)."""
    names = ["id"]
    for key in data:
        if key in ("schemas", "id", "meta"):
            continue
        if key == ENTERPRISE_SCHEMA and isinstance(data[key], Mapping):
            names.extend(f"{ENTERPRISE_SCHEMA}:{sub}" for sub in data[key])
        else:
            names.append(key)
    return names


def user_data(resource_id: UUID, state: Mapping[str, Any]) -> dict[str, Any]:
    """The User as the provider holds it after the change: RFC 9967 §2.4.1 `data` (with id)."""
    document = user_document(state)
    return {"schemas": document.pop("schemas"), "id": str(resource_id), **document}


def group_data(
    resource_id: UUID,
    display_name: str,
    external_id: str | None,
    extensions: Mapping[str, Any] | None = None,
    members: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """The Group as the provider holds it (RFC 7643 §4.2), with its members and extensions."""
    urns = sorted(extensions or {})
    data: dict[str, Any] = {"schemas": [GROUP_SCHEMA, *urns], "id": str(resource_id)}
    if external_id is not None:
        data["externalId"] = external_id
    data["displayName"] = display_name
    if members:
        data["members"] = [
            {"value": m} if display is None else {"value": m, "display": display}
            for m, display in members.items()
        ]
    for urn in urns:
        data[urn] = dict(extensions[urn]) if extensions else {}
    return data


def etag(version: int) -> str:
    """RFC 9967 §2.2 `version`: the ETag the resource has after the event (RFC 7644 §3.14)."""
    return f'W/"{version}"'


def payload_events(
    change: Change, *, method: str | None, full: bool, wanted: frozenset[str]
) -> dict[str, dict[str, Any]]:
    """The `events` claim: every URI of this one state change (RFC 9967 §2.1: several URIs in one
    SET are one state change of one subject), filtered to the stream's `wanted` names."""
    events: dict[str, dict[str, Any]] = {}
    version = {"version": etag(change.version)}
    if change.deleted:
        # §2.4.4: no payload attributes and no full/notice form (version is still a common
        # attribute of §2.2, the ETag the resource had last).
        if "prov:delete" in wanted:
            events[DELETE] = {}
        return events
    if change.created:
        name, base = "prov:create", CREATE
    elif method == "PUT":
        name, base = "prov:put", PUT
    else:
        name, base = "prov:patch", PATCH
    if name in wanted and (change.created or change.attributes):
        # §2.4: exactly one of `data` (":full") or `attributes` (":notice").
        if full and name == "prov:patch":
            data = {"schemas": [PATCH_SCHEMA], "Operations": change.operations}
            events[base + ":full"] = {**version, "data": data}
        elif full and resource(change) is not None:
            events[base + ":full"] = {**version, "data": resource(change)}
        else:
            attributes = (
                created_names(change) if change.created else change.attributes
            )
            events[base + ":notice"] = {**version, "attributes": attributes}
    if change.activated and not change.created and "prov:activate" in wanted:
        events[ACTIVATE] = dict(version)
    if change.deactivated and "prov:deactivate" in wanted:
        events[DEACTIVATE] = dict(version)
    return events


def sub_id(change: Change) -> dict[str, Any]:
    """RFC 9967 §2.1: the subject by `sub_id` (RFC 9493) in format "scim"; never `sub`."""
    subject: dict[str, Any] = {"format": "scim", "uri": change.uri}
    if change.external_id:
        subject["externalId"] = change.external_id
    return subject


def feed_subject(resource_type: str, resource_id: str, external_id: str | None) -> dict[str, Any]:
    subject: dict[str, Any] = {"format": "scim", "uri": f"/{resource_type}s/{resource_id}"}
    if external_id:
        subject["externalId"] = external_id
    return subject


def claims(
    *,
    issuer: str,
    audience: str,
    jti: str,
    iat: int,
    txn: str | None,
    subject: Mapping[str, Any],
    events: Mapping[str, Any],
) -> dict[str, Any]:
    """The SET's claims (RFC 8417 §2.2; `txn` RFC 9967 §2.2: the same for every SET of one
    transaction at the provider, across streams and retransmissions)."""
    out: dict[str, Any] = {"iss": issuer, "iat": iat, "jti": jti, "aud": audience}
    if txn:
        out["txn"] = txn
    out["sub_id"] = dict(subject)
    out["events"] = dict(events)
    return out
