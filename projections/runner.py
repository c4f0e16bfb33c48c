"""Catch-up subscribers for asynchronous projections.

One runner per projection per instance; exactly one of them is active across all instances,
holding a session advisory lock on a connection of its own (the others wait on standby, each
on a connection of its own, retrying the lock every `standby_interval` seconds, and so take over
within about that long once the active one's session ends: a killed instance's connection
closes with its process). The lock is a session's: through PgBouncer in transaction mode the
runners need a direct URL (SCIMLEDGER_DIRECT_DATABASE_URL, see Database.connect). Each step applies
a batch of events and moves the checkpoint in the same transaction, with the checkpoint row
locked, so an event's effect is applied exactly once even across restarts, failovers and
rebuilds (a rebuild's swap takes the same row lock).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog

from infra import metrics
from infra.database import Database
from infra.eventstore import NOTIFY_CHANNEL, Conn
from projections import state
from projections.registry import Projection
from projections.state import register

log = structlog.get_logger("scimledger.projections")
LOCK_NAMESPACE = 0x5C1E
# The session is gone, or is on a server that is no primary any more: not a handler's bug.
# The runner reconnects (a multi-host URL with target_session_attrs=read-write reaches the
# new primary), takes the lead again and continues from the checkpoint, which commits with
# every batch: no event is skipped or applied twice across a failover.
SESSION_LOST = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a statement cut by the server's death
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # 57P: admin shutdown, crash of the server
    asyncpg.ReadOnlySQLTransactionError,  # a standby now
)


class Runner:
    def __init__(
        self,
        db: Database,
        projection: Projection,
        *,
        batch_size: int = 1000,
        poll_interval: float = 1.0,
        standby_interval: float = 1.0,
    ) -> None:
        self.db = db
        self.projection = projection
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.standby_interval = standby_interval
        self.active = False
        self.applied = 0
        self.tables = {t: t for t in projection.tables}

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: take the lead when it is free, then follow the log."""
        name = self.projection.name

        def active(on: bool) -> None:
            self.active = on
            metrics.RUNNER_ACTIVE.labels(name).set(1 if on else 0)
            if on:
                log.info("projection runner active", projection=name)

        async def follow(conn: asyncpg.Connection) -> None:
            await register(conn, [self.projection])
            await self._follow(conn, stop)

        def interrupted(e: BaseException) -> None:
            log.warning(
                "projection runner interrupted", projection=name, error=f"{type(e).__name__}: {e}"
            )

        await lead(
            self.db,
            (LOCK_NAMESPACE, name),
            stop,
            self.standby_interval,
            follow,
            active,
            interrupted,
        )

    async def _follow(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        woken = asyncio.Event()

        def wake(*_: object) -> None:
            woken.set()

        await conn.add_listener(NOTIFY_CHANNEL, wake)
        while not stop.is_set():
            woken.clear()
            try:
                done = await self.step(conn)
            except SESSION_LOST:
                raise  # to `run`: a new session, on the writable primary (a failover)
            except Exception as e:  # a handler bug: record it, keep the checkpoint, retry
                # The retry decodes from the store: events kept in memory may have been
                # changed by the failed attempt.
                self.db.store.recent.clear()
                await self._record_error(conn, e)
                await _wait(stop, self.poll_interval * 5)
                continue
            if done == self.batch_size:
                continue
            await idle(conn, woken, stop, self.poll_interval)

    async def step(self, conn: Conn) -> int:
        """Apply one batch after the checkpoint; returns how many events it applied."""
        async with conn.transaction():
            position = await state.checkpoint(conn, self.projection.name, lock=True)
            store = self.db.store
            # The states are read with the heads unless this process keeps events it wrote
            # (RecentEvents): a bulk process's runners see mostly the front's events, and
            # reading heads, then states, would be two queries for one batch.
            heads = not self.projection.decodes or len(store.recent) > 0
            batch = await store.read_all(position, self.batch_size, conn=conn, heads=heads)
            if not batch:
                return 0
            events = await store.decode(conn, batch) if self.projection.decodes else []
            await self.projection.apply(conn, events, self.tables, batch)
            await state.advance(conn, self.projection.name, batch[-1].position)
        self.applied += len(batch)
        metrics.PROJECTION_APPLIED.labels(self.projection.name).inc(len(batch))
        return len(batch)

    async def _record_error(self, conn: Conn, error: Exception) -> None:
        text = f"{type(error).__name__}: {error}"[:2000]
        log.error("projection handler failed", projection=self.projection.name, error=text)
        with contextlib.suppress(Exception):
            await state.record_error(conn, self.projection.name, text)

async def lead(
    db: Database,
    lock: tuple[int, str],
    stop: asyncio.Event,
    standby_interval: float,
    follow: Callable[[asyncpg.Connection], Awaitable[None]],
    active: Callable[[bool], None],
    interrupted: Callable[[BaseException], None],
) -> None:
    """Until `stop` is set: a session on the writable primary that stands by until this
    instance holds the advisory `lock` (namespace, name), then `follow`s on it (a projection
    runner, the feed producer). A lost session (a failover, a restart of the server) is
    `interrupted`; a new one follows after `standby_interval`."""
    while not stop.is_set():
        conn: asyncpg.Connection | None = None
        leading = False
        try:
            conn = await db.connect()
            while not stop.is_set():
                if await conn.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))", *lock):
                    break
                await _wait(stop, standby_interval)
            else:
                continue
            leading = True
            active(True)
            await follow(conn)
        except (
            OSError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        ) as e:
            interrupted(e)
        finally:
            if leading:
                active(False)
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        await _wait(stop, standby_interval)


async def idle(
    conn: asyncpg.Connection, woken: asyncio.Event, stop: asyncio.Event, seconds: float
) -> None:
    """A follower with nothing to do waits for a notification, `stop` or `seconds`; then its
    session must still be on a server that takes writes. A demoted or read-only primary fails
    no plain read, so an idle follower would otherwise keep its session there for good."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_first(woken, stop), seconds)
    if stop.is_set():
        return
    if await conn.fetchval("SELECT current_setting('transaction_read_only')") == "on":
        raise asyncpg.ReadOnlySQLTransactionError("the server takes no writes now")


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def start_all(
    db: Database, projections: list[Projection], **kw: Any
) -> tuple[asyncio.Event, list[asyncio.Task[None]], list[Runner]]:
    stop = asyncio.Event()
    runners = [Runner(db, p, **kw) for p in projections if p.mode == "async"]
    tasks = [asyncio.get_running_loop().create_task(r.run(stop)) for r in runners]
    return stop, tasks, runners
