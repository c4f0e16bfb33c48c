"""The Group aggregate: a group's name and the record of membership changes.

Membership is not held here: a group can have 100,000 members, and replaying them on every
PATCH would be the cost of every PATCH. The service checks membership rows in the database in
the same transaction as the append; the aggregate validates the change and records it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import GroupAlreadyDeleted, InvalidValue
from domain.schema import (
    extension_changes,
    is_extension_urn,
    normalise_extension,
    resource_id,
    respell_extensions,
    split_extension_attribute,
)

DISPLAY_NAME = "displayName"
EXTERNAL_ID = "externalId"
MEMBERS = "members"


class Group(Aggregate):
    """A group of one tenant; deletion is final."""

    class GroupMembershipChanged(Aggregate.Event):
        """Members added and removed, by id; `displays` keeps a client's `display` of a new member.

        Version 1 had no `displays` (RFC 7643 §2.4 makes `display` immutable: set when a value
        is included, kept after); it reads as no displays.
        """

        class_version = 2
        added: list[str]
        removed: list[str]
        displays: dict[str, str]

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["displays"] = {}

    @event("GroupCreated")
    def __init__(
        self,
        id: UUID,
        tenant_id: UUID,
        display_name: str,
        external_id: str | None,
    ) -> None:
        # `id` is consumed by the library (it becomes originator_id, not an event field).
        self.tenant_id = tenant_id
        self.display_name = display_name
        self.external_id = external_id
        self.deleted = False
        # Extension attributes (URN -> {attribute: value}): set by GroupAttributesChanged.
        self.extensions: dict[str, Any] = {}

    @classmethod
    def create(
        cls,
        group_id: UUID,
        tenant_id: UUID,
        display_name: str,
        external_id: str | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> Group:
        """A new group with the caller's id: GroupCreated, then GroupAttributesChanged when it
        carries extension attributes."""
        display_name = _display_name(display_name)
        external_id = _external_id(external_id)
        wanted = normalise_extensions(extensions or {})
        group = cls(
            id=group_id,
            tenant_id=tenant_id,
            display_name=display_name,
            external_id=external_id,
        )
        changed = extension_changes({}, wanted)
        if changed:
            group._change_attributes(changed)
        return group

    @classmethod
    def from_state(
        cls,
        group_id: UUID,
        version: int,
        tenant_id: UUID,
        display_name: str,
        external_id: str | None,
        created_on: datetime,
        modified_on: datetime,
        extensions: Mapping[str, Any] | None = None,
    ) -> Group:
        """Rebuild a group at `version` from stored state, to apply later events to."""
        group = object.__new__(cls)
        group.__base_init__(
            originator_id=group_id, originator_version=version, timestamp=created_on
        )
        group.modified_on = modified_on
        group.tenant_id = tenant_id
        group.display_name = display_name
        group.external_id = external_id
        group.deleted = False
        group.extensions = _copy(dict(extensions or {}))
        return group

    # -- commands ---------------------------------------------------------------------------

    def update(
        self,
        display_name: str,
        external_id: str | None,
        extensions: Mapping[str, Any] | None = None,
    ) -> None:
        """Move to the desired name, externalId and (when given) extension attributes,
        triggering only what changed."""
        self._check_not_deleted()
        display_name = _display_name(display_name)
        external_id = _external_id(external_id)
        changed: dict[str, Any] = {}
        if extensions is not None:
            wanted = respell_extensions(self.extensions, normalise_extensions(extensions))
            changed = extension_changes(self.extensions, wanted)
        if display_name != self.display_name:
            self._rename(display_name)
        if external_id != self.external_id:
            self._change_external_id(external_id)
        if changed:
            self._change_attributes(changed)

    def change_membership(
        self,
        added: Iterable[str],
        removed: Iterable[str],
        displays: Mapping[str, str] | None = None,
    ) -> None:
        """Record members added and removed (user or group ids); nothing if both are empty.

        Whether an added member exists, or a removed one was a member, is the service's
        question to the database; here the change must only make sense on its own.
        """
        self._check_not_deleted()
        add = sorted({resource_id(member, MEMBERS) for member in added})
        remove = sorted({resource_id(member, MEMBERS) for member in removed})
        both = set(add) & set(remove)
        if both:
            listed = ", ".join(sorted(both))
            raise InvalidValue(MEMBERS, f"members both added and removed: {listed}")
        if str(self.id) in add:
            raise InvalidValue(MEMBERS, "a group cannot be a member of itself")
        shown = {
            member: display
            for member, display in sorted((displays or {}).items())
            if isinstance(display, str) and display and member in add
        }
        if add or remove:
            self._change_membership(add, remove, shown)

    def delete(self) -> None:
        """SCIM DELETE. A second call raises GroupAlreadyDeleted."""
        self._check_not_deleted()
        self._delete()

    def _check_not_deleted(self) -> None:
        if self.deleted:
            raise GroupAlreadyDeleted(self.id)

    # -- events -----------------------------------------------------------------------------

    @event("GroupRenamed")
    def _rename(self, display_name: str) -> None:
        self.display_name = display_name

    @event("GroupExternalIdChanged")
    def _change_external_id(self, external_id: str | None) -> None:
        self.external_id = external_id

    @event(GroupMembershipChanged)
    def _change_membership(
        self, added: list[str], removed: list[str], displays: dict[str, str]
    ) -> None:
        """Changes nothing here: membership lives in the projection, not the aggregate."""

    @event("GroupAttributesChanged")
    def _change_attributes(self, changed: dict[str, Any]) -> None:
        """Extension attributes by full name (`urn:…:2.0:Group:Attribute`); None clears."""
        for key, value in changed.items():
            urn, attribute = split_extension_attribute(key)
            extension = dict(self.extensions.get(urn, {}))
            if value is None:
                extension.pop(attribute, None)
            else:
                extension[attribute] = _copy(value)
            if extension:
                self.extensions[urn] = dict(sorted(extension.items()))
            else:
                self.extensions.pop(urn, None)

    @event("GroupDeleted")
    def _delete(self) -> None:
        self.deleted = True


def normalise_extensions(extensions: Mapping[str, Any]) -> dict[str, Any]:
    """A group's extension attributes in canonical form (see domain.schema)."""
    canonical: dict[str, Any] = {}
    for urn, value in extensions.items():
        if not is_extension_urn(urn):
            raise InvalidValue(urn, f"{urn[:200]!r} is not an extension schema URN")
        attributes = normalise_extension(value, urn)
        if attributes:
            canonical[urn] = attributes
    return dict(sorted(canonical.items()))


_CONTAINERS = (dict, list)  # (a tuple: `dict | list` inline builds a union on each call)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) if isinstance(v, _CONTAINERS) else v for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) if isinstance(v, _CONTAINERS) else v for v in value]
    return value


def _display_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(DISPLAY_NAME, "displayName is required and must be a non-empty string")
    return value


def _external_id(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidValue(EXTERNAL_ID, "externalId must be a string")
    return value
