"""One transaction for one SCIM write: load aggregates, append their events, update the views.

Handlers never touch a connection: they load through the unit of work, call the domain, and
commit. Events and the inline projection rows commit together or not at all; followers are
woken after the commit.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction

from domain.user import User
from infra.database import Database
from infra.eventstore import RecordedEvent
from projections import users as users_view


class UnitOfWork:
    def __init__(self, db: Database, tenant_id: UUID, request_id: str | None) -> None:
        self.db = db
        self.tenant_id = tenant_id
        self.request_id = request_id
        self.recorded: list[RecordedEvent] = []
        self._users: dict[UUID, User] = {}
        self._conn: PoolConnectionProxy[Any] | None = None
        self._tx: Transaction | None = None

    async def __aenter__(self) -> UnitOfWork:
        self._conn = await self.db.pool.acquire()
        self._tx = self._conn.transaction()
        await self._tx.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._conn is not None and self._tx is not None
        try:
            if exc_type is None:
                await self._tx.commit()
            else:
                await self._tx.rollback()
        finally:
            await self.db.pool.release(self._conn)
            self._conn = None
        if exc_type is None and self.recorded:
            self.db.store.notify()

    @property
    def conn(self) -> PoolConnectionProxy[Any]:
        assert self._conn is not None, "the unit of work is not open"
        return self._conn

    async def user(self, user_id: UUID) -> User | None:
        """The user of this tenant, replayed from its stream; None if absent or another tenant's."""
        aggregate = await self.db.store.load(self.conn, user_id)
        if not isinstance(aggregate, User) or aggregate.tenant_id != self.tenant_id:
            return None
        self._users[user_id] = aggregate
        return aggregate

    def add_user(self, user: User) -> None:
        self._users[user.id] = user

    async def user_exists(self, user_id: UUID) -> bool:
        found = await self.conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM scim_users WHERE tenant_id = $1 AND id = $2)",
            self.tenant_id,
            user_id,
        )
        return bool(found)

    async def flush(self) -> list[RecordedEvent]:
        """Append pending events and update inline views; raises before commit on conflicts."""
        changed = [u for u in self._users.values() if u.pending_events]
        events = [e for u in changed for e in u.collect_events()]
        if not events:
            return []
        recorded = await self.db.store.append(self.conn, self.tenant_id, events, self.request_id)
        await users_view.write(self.conn, changed)
        self.recorded.extend(recorded)
        return recorded


def is_unique_violation(error: BaseException, index: str) -> bool:
    return (
        isinstance(error, asyncpg.UniqueViolationError)
        and getattr(error, "constraint_name", None) == index
    )
