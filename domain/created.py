"""An aggregate's first event, made as the eventsourcing library makes it from `cls(...)`,
without its generic path (binding the arguments to `__init__`'s signature, resolving the topic
back to the class, filtering the event's fields twice): on the write path of every POST."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic


def created(
    aggregate: type[Aggregate], event_class: Any, originator_id: UUID, **fields: Any
) -> Any:
    """The event `event_class` (the one `@event` made for `aggregate.__init__`) with `fields`:
    the same class, fields and timestamp as `aggregate(id=originator_id, **fields)` records."""
    return event_class(
        originator_topic=get_topic(aggregate),
        originator_id=originator_id,
        originator_version=aggregate.INITIAL_VERSION,
        timestamp=event_class.create_timestamp(),
        **fields,
    )
