"""One transaction for one SCIM write: load aggregates, append their events, update the views.

Handlers never touch a connection: they load through the unit of work, call the domain, and
commit. Events and the inline projection rows commit together or not at all; followers are
woken after the commit.

The transaction starts with the first locking read or multi-statement write (`begin`). A user
write that took no lock (POST /Users, PATCH /Users) needs none: its flush is ONE statement (the
events' INSERT with the users view's upsert), which PostgreSQL runs as its own transaction;
POST /Users is one round trip instead of four. Nothing may fail after such a flush: it is
committed when `flush` returns.

The connection is borrowed from the pool at the unit's first statement, not when it opens: a
POST /Users whose events another request appends with its own (service/group_commit.py) never
borrows one.
"""

from __future__ import annotations

import functools
import uuid
from types import TracebackType
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction

from domain.group import Group
from domain.request import ProvisioningRequest
from domain.user import User
from infra.database import Database
from infra.eventstore import RecordedEvent
from projections import groups as groups_view
from projections import users as users_view
from projections.memberships import Memberships
from service import group_commit

if TYPE_CHECKING:  # service.outcomes imports the app's state, which names the handlers
    from service.outcomes import RequestContext

_STREAM_LOCKS = 0x5C1F  # advisory locks of user and group streams (0x5C1E: projection runners)

class UnitOfWork:
    def __init__(
        self,
        db: Database,
        tenant_id: UUID,
        request_id: str | None,
        audit: RequestContext | None = None,
    ) -> None:
        """`audit`: the request as its provisioning-log entry records it (who asked, what,
        and its outcome), committed with the request's events; None outside HTTP."""
        self.db = db
        self.audit = audit
        self.tenant_id = tenant_id
        self.request_id = request_id
        self.recorded: list[RecordedEvent] = []
        self._appended: list[Any] = []  # the domain events of `recorded`
        self._users: dict[UUID, User] = {}
        self._groups: dict[UUID, Group] = {}
        self._queued: set[UUID] = set()
        self._conn: PoolConnectionProxy[Any] | None = None  # borrowed at the first statement
        self._open = False
        self._tx: Transaction | None = None
        self._committed = False  # a flush without a transaction: committed by its statement

    @functools.cached_property
    def memberships(self) -> Memberships:
        """The memberships repository, on this unit's transaction. Made when first asked (a
        group write, a user's delete): it refers back to the unit (a reference cycle), which
        a user's write, freed as it ends, never has to wait for the cyclic collector to free."""
        return Memberships(self.begin, self.tenant_id)

    async def __aenter__(self) -> UnitOfWork:
        self._open = True
        return self

    async def _connection(self) -> PoolConnectionProxy[Any]:
        """The unit's connection, borrowed from the pool on the first call."""
        assert self._open, "the unit of work is not open"
        if self._conn is None:
            self._conn = await self.db.pool.acquire()
        return self._conn

    async def begin(self) -> PoolConnectionProxy[Any]:
        """The connection, in this unit's transaction (started on the first call)."""
        conn = await self._connection()
        if self._tx is None:
            assert not self._committed, "this unit of work already committed"
            self._tx = conn.transaction()
            await self._tx.start()
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        try:
            if self._tx is not None:
                if exc_type is None:
                    await self._tx.commit()
                else:
                    await self._tx.rollback()
        finally:
            if self._conn is not None:
                await self.db.pool.release(self._conn)
                self._conn = None
        if (exc_type is None or self._committed) and self.recorded:
            if self.audit is not None:
                self.audit.recorded = True
            self.db.store.committed(self.recorded, self._appended)

    async def _reader(self) -> PoolConnectionProxy[Any]:
        """For plain reads (no lock): they need no transaction. Under READ COMMITTED each
        statement sees what was committed when it started, in a transaction or not; a user's
        stream is guarded by its version (a rival append makes the flush a ConcurrencyError)."""
        return await self._connection()

    @property
    def conn(self) -> PoolConnectionProxy[Any]:
        """The connection, once `begin` started the transaction."""
        assert self._conn is not None, "the unit of work is not open"
        assert self._tx is not None, "begin() the unit of work before using its connection"
        return self._conn

    async def user(self, user_id: UUID) -> User | None:
        """The user of this tenant, replayed from its stream; None if absent or another tenant's."""
        aggregate = await self.db.store.load(await self._reader(), user_id)
        if not isinstance(aggregate, User) or aggregate.tenant_id != self.tenant_id:
            return None
        self._users[user_id] = aggregate
        return aggregate

    def add_user(self, user: User) -> None:
        self._users[user.id] = user

    async def user_for_update(self, user_id: UUID) -> User | None:
        """Like `user`, and lock the user's row so no group adds it while it is deleted, and
        concurrent writers queue instead of racing (after `_queue_for`, as for groups)."""
        await self._queue_for(user_id)
        await users_view.lock_row(await self.begin(), self.tenant_id, user_id)
        return await self.user(user_id)

    async def group(self, group_id: UUID) -> Group | None:
        """The group of this tenant, from its row (its snapshot), locked for this transaction.

        A group's stream holds every membership change it ever had; replaying it on each
        PATCH would cost more as the group grows. The row is written in the same transaction
        as every group event, so it is always the stream's head, and the row lock orders
        concurrent writers to one group instead of letting them race and retry.
        """
        if group_id in self._groups:
            return self._groups[group_id]
        await self._queue_for(group_id)
        group = await groups_view.load_for_update(await self.begin(), self.tenant_id, group_id)
        if group is not None:
            self._groups[group_id] = group
        return group

    async def _queue_for(self, group_id: UUID) -> None:
        """Writers to one stream (a group, or a user they lock) first queue on a lock that
        assigns no transaction id: each then takes its id (its place in the followers' order)
        after the previous writer committed, so the stream's events reach followers in version
        order. Waiters on the row lock alone hold ids taken before they waited, and are not
        woken in that order. (Should one still come late, the event store refuses its append
        and the handler retries it: infra.eventstore.OutOfOrder.)"""
        if group_id not in self._queued:
            await (await self.begin()).execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))", _STREAM_LOCKS, str(group_id)
            )
            self._queued.add(group_id)

    async def queue_for_groups_of(self, member_id: UUID) -> None:
        """Before this transaction takes its id: queue for every group `member_id` is in (it
        is about to leave them), in one order. See `queued_for`."""
        for group_id in await self.memberships.groups_of(member_id):
            await self._queue_for(group_id)

    def queued_for(self, group_id: UUID) -> bool:
        """Whether this transaction queued for the group before it took its id. A writer that
        joins a group after that would write it under an id older than the group's last."""
        return group_id in self._queued

    def add_group(self, group: Group) -> None:
        self._groups[group.id] = group

    async def user_exists(self, user_id: UUID) -> bool:
        return await users_view.exists(await self._reader(), self.tenant_id, user_id)

    async def flush(self) -> list[RecordedEvent]:
        """Append pending events and update inline views; raises before commit on conflicts."""
        users = [u for u in self._users.values() if u.pending_events]
        groups = [g for g in self._groups.values() if g.pending_events]
        user_events = [e for u in users for e in u.collect_events()]
        group_events = [e for g in groups for e in g.collect_events()]
        if not user_events and not group_events:
            return []
        outcome: list[Any] = []
        if self.audit is not None:
            # The request's own record commits with its changes: one audit entry, whole.
            outcome = [
                ProvisioningRequest.recorded(
                    uuid.uuid4(),
                    self.tenant_id,
                    "success",
                    self.audit.describe(self.audit.success_status()),
                )
            ]
        events = [*user_events, *group_events, *outcome]
        if users and not groups and not any(u.deprovisioned for u in users):
            # The common write (a user created or changed): one statement, one round trip.
            if self._tx is None and self.db.group_commit and _new_user(users, events):
                # POST /Users: with those of concurrent requests, in one transaction (on a
                # connection borrowed then, unless this unit holds one already).
                recorded = await group_commit.of(self.db.store).append_new_user(
                    self._conn, self.tenant_id, events, self.request_id, users[0]
                )
            else:
                statement, args = users_view.append_upsert(users)
                recorded = await self.db.store.append_with(
                    await self._connection(),
                    self.tenant_id,
                    events,
                    self.request_id,
                    statement,
                    args,
                )
            self._committed = self._tx is None
            if self._committed:
                # Kept for this process's followers at once: one woken by another commit
                # may read these before this unit of work is closed.
                self.db.store.recent.remember(recorded, events)
                self.recorded.extend(recorded)
                return recorded
        else:
            conn = await self.begin()
            recorded = await self.db.store.append(conn, self.tenant_id, events, self.request_id)
            if users:
                await users_view.write(conn, users)
            if groups:
                await groups_view.write(conn, groups, group_events)
        self.recorded.extend(recorded)
        self._appended.extend(events)
        return recorded


def _new_user(users: list[User], events: list[Any]) -> bool:
    """One new user, and only first events (its own and its request's record)."""
    return len(users) == 1 and all(e.originator_version == 1 for e in events)


def is_unique_violation(error: BaseException, index: str) -> bool:
    return (
        isinstance(error, asyncpg.UniqueViolationError)
        and getattr(error, "constraint_name", None) == index
    )
