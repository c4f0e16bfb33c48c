"""A provisioning request as the service answered it: the record behind each audit entry.

Each request that writes (POST, PUT, PATCH, DELETE) gets a stream of its own, one event long,
so recording outcomes never serialises writers. A request that changed something records its
outcome in the same transaction as its domain events (`success`); one that changed nothing
records `skipped` ("source and target already match"); one that failed records `failure` with
the SCIM error the client got.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.created import created

OUTCOMES = ("success", "skipped", "failure")


class ProvisioningRequest(Aggregate):
    """One SCIM write request of one tenant; recorded once, never changed."""

    @event("RequestRecorded")
    def __init__(
        self,
        id: UUID,
        tenant_id: UUID,
        outcome: str,
        request: dict[str, Any],
        error: dict[str, Any] | None,
    ) -> None:
        self.tenant_id = tenant_id
        self.outcome = outcome
        self.request = request
        self.error = error

    @classmethod
    def record(
        cls,
        request_id: UUID,
        tenant_id: UUID,
        outcome: str,
        request: dict[str, Any],
        error: dict[str, Any] | None = None,
    ) -> ProvisioningRequest:
        """`request`: method, path, status, initiatedBy, client, targetType, targetId,
        clientRequestId (the client's X-Request-Id, if any), durationMs. `error` (failures
        only): status, scimType, detail."""
        _check(outcome)
        return cls(
            id=request_id,
            tenant_id=tenant_id,
            outcome=outcome,
            request=dict(request),
            error=dict(error) if error is not None else None,
        )

    @classmethod
    def recorded(
        cls,
        request_id: UUID,
        tenant_id: UUID,
        outcome: str,
        request: dict[str, Any],
        error: dict[str, Any] | None = None,
    ) -> Aggregate.Event:
        """The one event of `record(...)`, made as the library makes it, without the
        aggregate nothing reads (a request's record is written, never loaded, by its writer)."""
        _check(outcome)
        recorded: Aggregate.Event = created(
            cls,
            cls.RequestRecorded,  # type: ignore[attr-defined]  # made by @event
            request_id,
            tenant_id=tenant_id,
            outcome=outcome,
            request=dict(request),
            error=dict(error) if error is not None else None,
        )
        return recorded


def _check(outcome: str) -> None:
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
