"""The erasure of a data subject (issue 17): a stream of its own, one event long.

`SubjectErased` holds no personal data: which subject (by id), who asked, why, and how many
events and rows were made unreadable or removed. The subject's own events stay in the ledger,
their personal values sealed with a key that no longer exists (infra.keys).
"""

from __future__ import annotations

from uuid import UUID

from eventsourcing.domain import Aggregate, event


class Erasure(Aggregate):
    """One erasure of one subject of one tenant; recorded once, never changed."""

    @event("SubjectErased")
    def __init__(
        self,
        id: UUID,
        tenant_id: UUID,
        subject_id: UUID,
        subject_type: str,
        requested_by: str,
        reason: str | None,
        events: int,
        rows_deleted: int,
        audit_entries: int,
    ) -> None:
        self.tenant_id = tenant_id
        self.subject_id = subject_id
        self.subject_type = subject_type
        self.requested_by = requested_by
        self.reason = reason
        self.events = events
        self.rows_deleted = rows_deleted
        self.audit_entries = audit_entries
