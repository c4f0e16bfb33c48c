"""The projections this service keeps, by name, and what a projection is."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, Protocol, cast

from infra.eventstore import Conn
from projections import activity, audit, groups, users

# inline: written in the append's own transaction by the write path;
# async: a runner folds the events after a stored checkpoint (projection_state).
Lifecycle = Literal["inline", "async"]


class Projection(Protocol):
    """A read model: a name, a version (a new one asks for a rebuild), a lifecycle, the tables
    it owns, the events it folds, and `apply`, the handler that folds them; rebuilt from
    position 0 by the same handler (projections/rebuild.py)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def mode(self) -> Lifecycle:
        """The lifecycle (stored as projection_state.mode)."""
        ...

    @property
    def tables(self) -> tuple[str, ...]: ...

    @property
    def handles(self) -> tuple[type, ...] | None:
        """The event classes it folds (None: any); a replay decodes only those."""
        ...

    @property
    def decodes(self) -> bool:
        """Does `apply` read the decoded events, or only the recorded ones (topic, tenant…)?"""
        ...

    async def apply(
        self,
        conn: Conn,
        events: Sequence[Any],
        tables: Mapping[str, str],
        recorded: Sequence[Any] | None = None,
    ) -> None:
        """Fold a batch of decoded events into `tables` (live name -> the name to write,
        a shadow's in a rebuild); `recorded` (same order) carries tenant and time."""
        ...

    def describe(self, table: str, row: Mapping[str, Any]) -> str:
        """A row of one of its tables, as a rebuild's diff names it."""
        ...

    def replay(self) -> Replay | None:
        """What a rebuild's bulk replay folds with instead of `apply`, if anything."""
        ...


class Replay(Protocol):
    """A bulk replay's folding that keeps state in memory between batches (the rebuild has its
    shadow tables to itself until then), written to them by `flush` at the replay's end."""

    async def apply(
        self, conn: Conn, events: Sequence[Any], tables: Mapping[str, str], recorded: Sequence[Any]
    ) -> None: ...

    async def flush(self, conn: Conn, tables: Mapping[str, str]) -> None: ...


@dataclass(frozen=True)
class ModuleProjection:
    """A projection written as a module: NAME, VERSION, TABLES, apply, describe, and
    optionally HANDLES and DECODES."""

    name: str
    version: int
    mode: Lifecycle
    tables: tuple[str, ...]
    module: ModuleType

    @classmethod
    def of(cls, module: ModuleType, mode: Lifecycle) -> ModuleProjection:
        return cls(module.NAME, module.VERSION, mode, module.TABLES, module)

    @property
    def handles(self) -> tuple[type, ...] | None:
        handles: tuple[type, ...] | None = getattr(self.module, "HANDLES", None)
        return handles

    @property
    def decodes(self) -> bool:
        return bool(getattr(self.module, "DECODES", True))

    async def apply(
        self,
        conn: Conn,
        events: Sequence[Any],
        tables: Mapping[str, str],
        recorded: Sequence[Any] | None = None,
    ) -> None:
        if self.mode == "async":
            await self.module.apply(conn, events, tables, recorded)
        else:
            await self.module.apply(conn, events, tables)

    def describe(self, table: str, row: Mapping[str, Any]) -> str:
        text: str = self.module.describe(table, row)
        return text

    def replay(self) -> Replay | None:
        """The module's `Replay`, if it has one (the audit log's)."""
        factory = getattr(self.module, "Replay", None)
        return None if factory is None else cast(Replay, factory())


PROJECTIONS: dict[str, Projection] = {
    p.name: p
    for p in (
        ModuleProjection.of(users, "inline"),
        ModuleProjection.of(groups, "inline"),
        ModuleProjection.of(activity, "async"),
        ModuleProjection.of(audit, "async"),
    )
}
