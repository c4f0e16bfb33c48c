"""Pure domain model: aggregates whose methods are the events. No I/O, no service imports."""

from domain.errors import (
    AlreadyDeprovisioned,
    DomainError,
    GroupAlreadyDeleted,
    InvalidValue,
    ResourceDeleted,
)
from domain.group import Group
from domain.schema import (
    NAME_SUB_ATTRIBUTES,
    USER_ENTERPRISE_ATTRIBUTES,
    USER_MULTI_VALUED_ATTRIBUTES,
    USER_STRING_ATTRIBUTES,
)
from domain.user import User

__all__ = [
    "NAME_SUB_ATTRIBUTES",
    "USER_ENTERPRISE_ATTRIBUTES",
    "USER_MULTI_VALUED_ATTRIBUTES",
    "USER_STRING_ATTRIBUTES",
    "AlreadyDeprovisioned",
    "DomainError",
    "Group",
    "GroupAlreadyDeleted",
    "InvalidValue",
    "ResourceDeleted",
    "User",
]
