"""Group commit of POST /Users: the new users of concurrent requests in one transaction.

PostgreSQL's CPU per POST is mostly per transaction (issue 16): one user per transaction
costs it about four times what one user of a 16-user statement does. So the requests of a
process that flush a new user while another such flush is in flight wait for it, and the
first of them then appends them all (at most BATCH_LIMIT) in ONE statement
(infra/eventstore_batch.py), with the users view's rows. A request that finds no flush in
flight is appended at once, alone, with the one-statement append of a single request: no
timer, no wait when idle.

- Nothing is acknowledged before its transaction committed: a request returns from `append`
  once the statement that holds its events returned.
- A batch that fails (a userName or another unique value taken, by a committed user or by
  another request of the batch; a value too long for its index) wrote nothing; each of its
  requests is then appended alone, on its own connection, and gets its own outcome: its own
  SCIM error, or its commit. One request's error never fails another's. A batch whose commit
  is unknown (the connection lost mid-statement) fails all its requests as a lone request's
  would (`wrote_nothing`).
- The batch runs on the connection of the request that leads it; a request that holds none
  (its unit of work borrows one at its first statement, and a POST's first is its append)
  borrows one from the pool once it leads, or appends alone. A request appended by another's
  batch never borrows one.

SCIMLEDGER_GROUP_COMMIT=0 appends each request alone (Settings.group_commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from collections.abc import Sequence
from uuid import UUID

import asyncpg
from eventsourcing.domain import DomainEventProtocol

from domain.user import User
from infra.eventstore import Conn, EventStore, RecordedEvent
from infra.eventstore_batch import Sealed, append_batch
from projections import users as users_view

BATCH_LIMIT = 32


class _Turn:
    """What a waiting request is told: lead the next batch, or append alone."""


_LEAD = _Turn()
_ALONE = _Turn()


class _Waiting:
    __slots__ = ("conn", "outcome", "sealed")

    def __init__(self, conn: Conn | None, sealed: Sealed) -> None:
        self.conn = conn
        self.sealed = sealed
        self.outcome: asyncio.Future[list[RecordedEvent] | _Turn] = (
            asyncio.get_running_loop().create_future()
        )


class GroupCommit:
    """The group commit of one process's event store (`of`)."""

    def __init__(self, store: EventStore, limit: int = BATCH_LIMIT) -> None:
        self.store = store
        self.limit = limit
        self._queue: deque[_Waiting] = deque()
        self._busy = False  # a flush (alone or a batch) is in flight

    async def append_new_user(
        self,
        conn: Conn | None,
        tenant_id: UUID,
        events: Sequence[DomainEventProtocol[UUID]],
        request_id: str | None,
        user: User,
    ) -> list[RecordedEvent]:
        """Append the events of a request that provisions `user` (first events only: the
        user's and its request record's), with the user's row, committed when this returns.
        `conn`: the request's connection, or None to borrow one only if this request appends
        (alone, or leading a batch)."""
        stored, new_keys = await self.store.seal(conn or self.store.pool, tenant_id, events)
        sealed = Sealed(tenant_id, request_id, stored, new_keys, [users_view.row_of(user)])
        if not self._busy:
            self._busy = True
            try:
                return await self._alone(conn, sealed)
            finally:
                self._hand_on()
        me = _Waiting(conn, sealed)
        self._queue.append(me)
        try:
            turn = await me.outcome
        except asyncio.CancelledError:
            if me in self._queue:  # not yet in a batch: it never will be
                self._queue.remove(me)
            elif me.outcome.done() and not me.outcome.cancelled() and me.outcome.result() is _LEAD:
                self._hand_on()  # told to lead, cancelled before it could: the next one leads
            raise
        if isinstance(turn, list):
            return turn
        if turn is _ALONE:
            return await self._alone(conn, sealed)
        return await self._lead(me)

    async def _lead(self, me: _Waiting) -> list[RecordedEvent]:
        """Append `me` and those queued behind it (up to the limit) in one statement."""
        batch = [me]
        while self._queue and len(batch) < self.limit:
            waiting = self._queue.popleft()
            if not waiting.outcome.done():  # (one cancelled, not yet out of the queue: never)
                batch.append(waiting)
        if len(batch) == 1:
            try:
                return await self._alone(me.conn, me.sealed)
            finally:
                self._hand_on()
        # The batch runs on the leader's connection, in a task of its own: should the leader
        # be cancelled, the batch still ends (and settles the others) before the connection
        # goes back to the pool.
        task = asyncio.ensure_future(self._batch(me.conn, [w.sealed for w in batch]))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            while not task.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([task])
            self._settle(batch, task)
            raise
        except BaseException:
            pass  # the batch's error: settled below, as for the others
        self._settle(batch, task)
        if task.cancelled():
            return await self._alone(me.conn, me.sealed)
        if (error := task.exception()) is not None:
            if not wrote_nothing(error):
                raise error
            return await self._alone(me.conn, me.sealed)
        return task.result()[0]

    def _settle(
        self, batch: list[_Waiting], task: asyncio.Future[list[list[RecordedEvent]]]
    ) -> None:
        """The batch's others get their events as recorded, or (a failed batch wrote nothing)
        the word to append alone; the next waiting request leads."""
        error = None if task.cancelled() else task.exception()
        if error is not None and not wrote_nothing(error):
            # Not retried: its new subjects' keys are forgotten, as a lone append's would be
            # (EventStore._insert); read again from the database if the batch did commit.
            self.store.keys.forget(k[0] for w in batch for k in w.sealed.new_keys)
        for i, other in enumerate(batch[1:], 1):
            if other.outcome.done():
                continue
            if error is not None and not wrote_nothing(error):
                other.outcome.set_exception(error)  # as the leader's: committed or not, unknown
            elif task.cancelled() or error is not None:
                other.outcome.set_result(_ALONE)
            else:
                other.outcome.set_result(task.result()[i])
        self._hand_on()

    def _hand_on(self) -> None:
        """After a flush: the first request still waiting leads the next batch; none: idle."""
        while self._queue:
            first = self._queue.popleft()
            if not first.outcome.done():  # (one cancelled meanwhile is skipped)
                first.outcome.set_result(_LEAD)
                return
        self._busy = False

    async def _batch(self, conn: Conn | None, batch: list[Sealed]) -> list[list[RecordedEvent]]:
        """The batch's one statement, on `conn` or on a connection borrowed for it."""
        if conn is not None:
            return await append_batch(conn, users_view.BATCH_APPEND_NEW, batch)
        async with self.store.pool.acquire() as borrowed:
            return await append_batch(borrowed, users_view.BATCH_APPEND_NEW, batch)

    async def _alone(self, conn: Conn | None, sealed: Sealed) -> list[RecordedEvent]:
        """The one-statement append of a single request (EventStore.append_with), on `conn`
        or on a connection borrowed for it."""
        if conn is None:
            async with self.store.pool.acquire() as borrowed:
                return await self._alone(borrowed, sealed)
        return await self.store.append_sealed_with(
            conn,
            sealed.tenant_id,
            sealed.stored,
            sealed.new_keys,
            sealed.request_id,
            users_view.APPEND_INSERT_NEW,
            list(sealed.rows[0]),
        )


# SQLSTATE classes of errors PostgreSQL reports for a statement it did not commit (a value
# refused, a unique value taken, a conflict, a limit, a cancelled statement), after which the
# batch's requests are each appended alone. Any other error (the connection lost, the server
# shutting down or failing) leaves unknown whether the batch committed: its requests all fail
# as a lone request would, never retried into a false 409 for a user that was created.
_NOT_WRITTEN = {"22", "23", "40", "42", "53", "54", "57014"}


def wrote_nothing(error: BaseException) -> bool:
    """Whether a failed batch statement certainly wrote nothing (PostgreSQL said so)."""
    state = getattr(error, "sqlstate", None)
    return (
        isinstance(error, asyncpg.PostgresError)
        and isinstance(state, str)
        and (state[:2] in _NOT_WRITTEN or state in _NOT_WRITTEN)
    )


_COMMITS: weakref.WeakKeyDictionary[EventStore, GroupCommit] = weakref.WeakKeyDictionary()


def of(store: EventStore) -> GroupCommit:
    """The group commit of `store` (one per event store, so one per process's pool)."""
    commits = _COMMITS.get(store)
    if commits is None:
        commits = _COMMITS[store] = GroupCommit(store)
    return commits
