"""The SCIM writes as commands: plain data, named in the field's words, one per write.

The HTTP layer (service/scim/) parses a request into one of these; service/handlers.py carries
it out. A command holds what the client asked for, already checked for shape; whether it can
be done (the resource exists, the ETag matches, the members are of this tenant) is the
handler's to find out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

UNSET: Any = object()  # "not in the request", as distinct from null


@dataclass(frozen=True, slots=True)
class Unique:
    """A declared extension attribute whose values are unique in the tenant (uniqueness:
    server)."""

    urn: str
    attribute: str
    case_exact: bool
    kind: str = "string"  # its declared type: the unique index reads the value as one


@dataclass(frozen=True, slots=True)
class CreateUser:
    desired: Mapping[str, Any]
    unique: tuple[Unique, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplaceUser:
    user_id: UUID
    desired: Mapping[str, Any]
    if_match: str | None = None
    # A large body: the change runs in a worker thread (so does one to a user of many values).
    large: bool = False
    unique: tuple[Unique, ...] = ()
    # The tenant's declared User extensions (case-folded URN -> schema): immutable ones kept.
    declared: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PatchUser:
    """RFC 7644 §3.5.2 operations on a user, as parsed ({"op", "path", "value"} each)."""

    user_id: UUID
    operations: tuple[dict[str, Any], ...]
    if_match: str | None = None
    large: bool = False
    unique: tuple[Unique, ...] = ()
    max_values: int | None = None
    # The user may grow to this many bytes of JSON (what one request body may carry).
    max_bytes: int | None = None
    # The tenant rejects undeclared extension attributes.
    reject: bool = False
    # The tenant's declared User extensions (case-folded URN -> schema).
    declared: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeleteUser:
    user_id: UUID
    if_match: str | None = None


@dataclass
class GroupEdit:
    """What a POST, PUT or PATCH of a group asks for: attributes to set and members to add or
    remove. A group may have 100,000 members, so the edit never holds the member list: ids to
    add, ids to remove, or "every current member removed"; the handler asks the membership
    rows which of them change anything."""

    display_name: Any = UNSET
    external_id: Any = UNSET
    adds: set[str] = field(default_factory=set)
    removes: set[str] = field(default_factory=set)
    clear_members: bool = False
    # A client's `display` of a member it adds (RFC 7643 §2.4: immutable, set at inclusion).
    displays: dict[str, str] = field(default_factory=dict)
    # Undeclared extensions: all of them (POST, PUT), or PATCH operations on them, applied to
    # the group's current ones by the handler.
    extensions: Any = UNSET
    extension_ops: list[tuple[str, str, Any]] = field(default_factory=list)
    max_values: int | None = None
    # The tenant's declared Group extensions (case-folded URN -> schema): their values checked.
    declared: dict[str, Any] = field(default_factory=dict)

    def add(self, ids: set[str]) -> None:
        self.adds |= ids
        self.removes -= ids

    def remove(self, ids: set[str]) -> None:
        self.removes |= ids
        self.adds -= ids

    def replace_members(self, ids: set[str]) -> None:
        self.clear_members = True
        self.adds = set(ids)
        self.removes = set()

    @property
    def touches_members(self) -> bool:
        return self.clear_members or bool(self.adds) or bool(self.removes)


@dataclass(frozen=True, slots=True)
class CreateGroup:
    edit: GroupEdit


@dataclass(frozen=True, slots=True)
class ChangeGroup:
    """PUT or PATCH of a group."""

    group_id: UUID
    edit: GroupEdit
    if_match: str | None = None


@dataclass(frozen=True, slots=True)
class DeleteGroup:
    group_id: UUID
    if_match: str | None = None
