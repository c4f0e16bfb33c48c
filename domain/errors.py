"""Rules a command can break. Raised before any event is triggered, so nothing is recorded.

The service layer maps them to SCIM errors: `InvalidValue` to 400 `invalidValue`,
`ResourceDeleted` to 404.
"""

from __future__ import annotations

from uuid import UUID

# An error detail may quote the client's input (`invalid path '…'`); the reply and the
# provisioning log, which keeps it forever, get at most this much of it.
MAX_DETAIL = 500
# Room for the mark up to "…[cut 999,999,999,999,999 characters]…", so a bounded detail is
# never longer than MAX_DETAIL, and bounding it again (the audit record) changes nothing.
_TAIL, _MARK_ROOM = 80, 40
_HEAD = MAX_DETAIL - _TAIL - _MARK_ROOM


def bounded(detail: str) -> str:
    """`detail`, or past MAX_DETAIL characters its head and tail with the cut marked between
    them: "invalid path 'xxx…[cut 199,540 characters]…xxx'"."""
    if len(detail) <= MAX_DETAIL:
        return detail
    return f"{detail[:_HEAD]}…[cut {len(detail) - _HEAD - _TAIL:,} characters]…{detail[-_TAIL:]}"


class DomainError(Exception):
    """A command was refused by the domain."""


class InvalidValue(DomainError):
    """An attribute value breaks a rule.

    `attribute` is the canonical name: "userName", "name.givenName", "enterprise.department".
    """

    def __init__(self, attribute: str, detail: str | None = None) -> None:
        self.attribute = attribute
        self.detail = bounded(detail or f"invalid value for {attribute}")
        super().__init__(self.detail)


class ResourceDeleted(DomainError):
    """A command reached a resource that was already deleted."""

    def __init__(self, resource_id: UUID, detail: str) -> None:
        self.resource_id = resource_id
        self.detail = bounded(detail)
        super().__init__(self.detail)


class AlreadyDeprovisioned(ResourceDeleted):
    def __init__(self, user_id: UUID) -> None:
        super().__init__(user_id, f"user {user_id} is deprovisioned")


class GroupAlreadyDeleted(ResourceDeleted):
    def __init__(self, group_id: UUID) -> None:
        super().__init__(group_id, f"group {group_id} is deleted")
