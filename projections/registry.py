"""The projections this service keeps, by name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from infra.eventstore import Conn
from projections import activity, audit, groups, users


@dataclass(frozen=True)
class Projection:
    """A read model: its tables, and the replay handler that folds events into them.

    Inline projections are written in the append's transaction by the write path and rebuilt
    by `apply`, the same handler code.
    """

    name: str
    version: int
    mode: str
    tables: tuple[str, ...]
    module: ModuleType

    async def apply(
        self,
        conn: Conn,
        events: Sequence[Any],
        tables: Mapping[str, str],
        recorded: Sequence[Any] | None = None,
    ) -> None:
        """Fold a batch of decoded events; `recorded` (same order) carries tenant and time."""
        if self.mode == "async":
            await self.module.apply(conn, events, tables, recorded)
        else:
            await self.module.apply(conn, events, tables)

    @property
    def decodes(self) -> bool:
        """Does `apply` read the decoded events, or only the recorded ones (topic, tenant…)?"""
        return bool(getattr(self.module, "DECODES", True))

    def describe(self, table: str, row: Mapping[str, Any]) -> str:
        text: str = self.module.describe(table, row)
        return text


PROJECTIONS: dict[str, Projection] = {
    p.name: p
    for p in (
        Projection(users.NAME, users.VERSION, "inline", users.TABLES, users),
        Projection(groups.NAME, groups.VERSION, "inline", groups.TABLES, groups),
        Projection(activity.NAME, activity.VERSION, "async", activity.TABLES, activity),
        Projection(audit.NAME, audit.VERSION, "async", audit.TABLES, audit),
    )
}
