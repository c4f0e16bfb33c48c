"""Opening the one database: the embedded server by default, any PostgreSQL via DATABASE_URL."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from infra.config import Settings
from infra.embedded import EmbeddedPostgres
from infra.eventstore import EventStore
from infra.keys import KeyRing, load_master_key
from infra.migrations import migrate


class DatabaseUnavailable(Exception):
    """The database could not be reached or started."""


ConnectionHook = Callable[[asyncpg.Connection], Awaitable[None]]
# Run on each new connection of this process (the bulk process lowers its backends' priority).
_connection_hooks: list[ConnectionHook] = []


def on_connect(hook: ConnectionHook) -> None:
    """Run `hook` on every connection this process opens from now on."""
    _connection_hooks.append(hook)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: b"\x01" + orjson.dumps(v),
        decoder=lambda b: orjson.loads(b[1:]),
        schema="pg_catalog",
        format="binary",
    )
    for hook in _connection_hooks:
        await hook(conn)


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """What a connection must not carry back into the pool: an open transaction.

    asyncpg's default reset sends four statements (advisory unlock, CLOSE ALL, UNLISTEN,
    RESET ALL) on every release, a round trip per borrowed connection. This service keeps no
    session state on pooled connections: cursors live in transactions, listeners unlisten
    when removed, advisory locks are transaction-scoped or held on connections of their own.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _server_settings() -> dict[str, str]:
    """Name our sessions in pg_stat_activity: which process holds which connection."""
    return {"application_name": f"scimledger:{os.getpid()}"}


@dataclass
class Database:
    dsn: str
    pool: asyncpg.Pool
    store: EventStore
    embedded: EmbeddedPostgres | None
    # Seconds to wait for a new connection before giving up (asyncpg's default is 60).
    connect_timeout: float = 60.0
    # A session-mode URL when `dsn` goes through a transaction-pooling PgBouncer.
    direct_dsn: str | None = None
    # Append concurrent POST /Users together (Settings.group_commit, service/group_commit.py).
    group_commit: bool = True

    async def connect(self) -> asyncpg.Connection:
        """A connection outside the pool, a real session (for LISTEN, session locks and
        long-running work)."""
        conn: asyncpg.Connection = await asyncpg.connect(
            self.direct_dsn or self.dsn,
            timeout=self.connect_timeout,
            server_settings=_server_settings(),
        )
        await _init_connection(conn)
        return conn


async def resolve_dsn(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    if settings.database_url:
        return settings.database_url, None
    embedded = EmbeddedPostgres(settings.data_dir)
    try:
        dsn = await asyncio.to_thread(embedded.start)
    except Exception as e:  # the wheel raises assorted errors (CalledProcessError, OSError, ...)
        raise DatabaseUnavailable(
            f"could not start embedded PostgreSQL in {embedded.pgdata}: {e}"
        ) from e
    return dsn, embedded


class _Pool(asyncpg.Pool):
    """asyncpg's pool, with a default bound on the wait for a connection (asyncpg has none:
    a pool whose connections are all held, e.g. by slow clients of streamed replies, would
    make every other request wait forever). TimeoutError past it: a 503 for HTTP requests."""

    acquire_timeout: float | None = None
    dropping = False  # drop_sessions is running on this pool

    def free_holders(self) -> int:
        """How many connection holders are free now (asyncpg's queue of them)."""
        free = getattr(self, "_queue", None)
        return 0 if free is None else int(free.qsize())

    def acquire(self, *, timeout: float | None = None) -> Any:
        if timeout is None and self.free_holders() > 0:
            # A connection is free: there is no wait to bound (asyncpg would still run the
            # acquisition under a timeout, a task and a timer per request). Connecting a
            # holder whose connection was closed keeps its own bound (the connect timeout),
            # and statements theirs (command_timeout).
            return super().acquire()
        return super().acquire(timeout=self.acquire_timeout if timeout is None else timeout)


async def drop_sessions(pool: asyncpg.Pool) -> None:
    """Every session of `pool` off its server now (the server turned read-only: a demoted
    primary). asyncpg's expire_connections closes an idle connection only when it is next
    acquired, and its free holders are a stack: after a demotion, the few acquisitions a quiet
    pool makes (each failing to connect, its holder put back on top) would leave the sessions
    below on the old server. So every free holder is taken at once, concurrently, each closing
    its old connection; connecting anew fails until a writable server answers, which is
    expected here. Connections in use close as they are released."""
    await pool.expire_connections()
    if not isinstance(pool, _Pool) or pool.dropping:
        return
    pool.dropping = True
    try:

        async def cycle() -> None:
            with contextlib.suppress(Exception):
                async with pool.acquire(timeout=5.0):
                    pass

        await asyncio.gather(*(cycle() for _ in range(pool.free_holders())))
    finally:
        pool.dropping = False


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 20,
    acquire_timeout: float | None = None,
    statement_cache_size: int | None = None,
    **kw: Any,
) -> asyncpg.Pool:
    """A pool; `statement_cache_size` None means SCIMLEDGER_STATEMENT_CACHE_SIZE (default 100)."""
    if statement_cache_size is None:
        statement_cache_size = Settings().statement_cache_size
    # What asyncpg.create_pool does, with our pool class (its every query acquires through
    # `acquire`, so the bound holds for pool.fetch() and friends too).
    pool = _Pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        max_queries=50000,
        max_inactive_connection_lifetime=300.0,
        init=_init_connection,
        reset=_reset_connection,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        statement_cache_size=statement_cache_size,
        # Ours (the session's name) and the caller's (e.g. a benchmark's synchronous_commit).
        server_settings={**_server_settings(), **kw.pop("server_settings", {})},
        **kw,
    )
    pool.acquire_timeout = acquire_timeout
    try:
        await pool
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise DatabaseUnavailable(f"cannot connect to the database: {e}") from e
    return pool


@asynccontextmanager
async def open_database(
    settings: Settings, *, run_migrations: bool = True, serving: bool = False
) -> AsyncIterator[Database]:
    """The database these settings name. `serving`: the pool of an HTTP server, whose every
    statement, and every wait for a free connection, gets `db_command_timeout` (never set for
    the CLI: a rebuild's statements may rightly run long)."""
    dsn, embedded = await resolve_dsn(settings)
    try:
        pool = await create_pool(
            dsn,
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            timeout=settings.db_connect_timeout,
            command_timeout=settings.db_command_timeout if serving else None,
            acquire_timeout=settings.db_command_timeout if serving else None,
            statement_cache_size=settings.statement_cache_size,
        )
        try:
            database = Database(
                dsn,
                pool,
                EventStore(pool, keys=KeyRing(load_master_key(settings.data_dir))),
                embedded,
                settings.db_connect_timeout,
                settings.direct_database_url,
                settings.group_commit,
            )
            try:
                if run_migrations:
                    # A connection of its own, without the pool's statement timeout: applying a
                    # migration (or waiting for another instance to apply it) may take long.
                    # It holds a session advisory lock: through PgBouncer, the direct URL.
                    conn = await database.connect()
                    try:
                        await migrate(conn)
                    finally:
                        await conn.close()
                yield database
            finally:
                await database.store.close()
        finally:
            await pool.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
