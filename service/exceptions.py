"""Why the service layer refuses a command. One middleware (service/middlewares.py,
`scim_errors`) turns each into its SCIM Error reply; the service layer knows no HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from domain.errors import bounded

if TYPE_CHECKING:
    from service.taken import Held


class ServiceError(Exception):
    def __init__(self, detail: str) -> None:
        self.detail = bounded(detail)
        super().__init__(self.detail)


class NotFound(ServiceError):
    def __init__(self, kind: str, resource_id: str) -> None:
        super().__init__(f"{kind} {resource_id} not found")


class Invalid(ServiceError):
    """A value the command carries breaks a rule (400 invalidValue)."""


class Taken(ServiceError):
    """A value another resource of the tenant holds (409 uniqueness). `holder`: that resource,
    when known: the detail quotes its value, so its record is sealed under the holder's key."""

    def __init__(self, detail: str, held: Held | None = None) -> None:
        super().__init__(detail)
        self.held = held  # what service.taken finds the holder by
        self.holder: UUID | None = None


class PreconditionFailed(ServiceError):
    """If-Match names a version the resource is no longer at (412)."""

    def __init__(self, detail: str = "The resource has changed (ETag mismatch)") -> None:
        super().__init__(detail)


class Conflict(ServiceError):
    """Other requests kept changing the resource; every retry lost (409 mutability)."""

    def __init__(
        self, detail: str = "The resource is being changed by other requests; retry"
    ) -> None:
        super().__init__(detail)
