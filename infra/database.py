"""Opening the one database: the embedded server by default, any PostgreSQL via DATABASE_URL."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from infra.config import Settings
from infra.embedded import EmbeddedPostgres
from infra.eventstore import EventStore
from infra.migrations import migrate


class DatabaseUnavailable(Exception):
    """The database could not be reached or started."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: b"\x01" + orjson.dumps(v),
        decoder=lambda b: orjson.loads(b[1:]),
        schema="pg_catalog",
        format="binary",
    )


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
    # A session-mode URL when `dsn` goes through a transaction-pooling PgBouncer.
    direct_dsn: str | None = None

    async def connect(self) -> asyncpg.Connection:
        """A connection outside the pool, a real session (for LISTEN and session locks)."""
        conn: asyncpg.Connection = await asyncpg.connect(
            self.direct_dsn or self.dsn, server_settings=_server_settings()
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


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 20,
    statement_cache_size: int | None = None,
    **kw: Any,
) -> asyncpg.Pool:
    """A pool; `statement_cache_size` None means SCIMLEDGER_STATEMENT_CACHE_SIZE (default 100)."""
    if statement_cache_size is None:
        statement_cache_size = Settings().statement_cache_size
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_reset_connection,
            statement_cache_size=statement_cache_size,
            server_settings=_server_settings(),
            **kw,
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise DatabaseUnavailable(f"cannot connect to the database: {e}") from e
    assert pool is not None
    return pool


@asynccontextmanager
async def open_database(
    settings: Settings, *, run_migrations: bool = True
) -> AsyncIterator[Database]:
    dsn, embedded = await resolve_dsn(settings)
    try:
        pool = await create_pool(
            dsn,
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            statement_cache_size=settings.statement_cache_size,
        )
        try:
            if run_migrations:
                await _migrate(pool, settings.direct_database_url)
            store = EventStore(pool)
            try:
                yield Database(
                    dsn=dsn,
                    pool=pool,
                    store=store,
                    embedded=embedded,
                    direct_dsn=settings.direct_database_url,
                )
            finally:
                await store.close()
        finally:
            await pool.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def _migrate(pool: asyncpg.Pool, direct_dsn: str | None) -> None:
    """Migrations hold a session advisory lock: through PgBouncer they need the direct URL."""
    if direct_dsn is None:
        async with pool.acquire() as conn:
            await migrate(conn)
        return
    try:
        direct = await asyncpg.connect(direct_dsn, server_settings=_server_settings())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise DatabaseUnavailable(f"cannot connect to the direct database URL: {e}") from e
    try:
        await migrate(direct)
    finally:
        await direct.close()
