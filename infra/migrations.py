"""Ordered SQL migrations, applied once each, under an advisory lock.

Several instances may start at the same moment: the first takes the lock and migrates, the others
wait for it and then find nothing left to do.
"""

from __future__ import annotations

from importlib import resources

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Conn = asyncpg.Connection | PoolConnectionProxy

# An arbitrary constant: pg_advisory_lock keys are global to the database.
MIGRATION_LOCK_KEY = 0x5C1E_D6E2


def available() -> list[tuple[str, str]]:
    """(name, sql) of every migration file, in order."""
    folder = resources.files("infra") / "migrations"
    files = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name.removesuffix(".sql"), p.read_text(encoding="utf-8")) for p in files]


async def applied(conn: Conn) -> list[str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return []
    rows = await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")
    return [r["name"] for r in rows]


async def pending(conn: Conn) -> list[str]:
    done = set(await applied(conn))
    return [name for name, _ in available() if name not in done]


async def migrate(conn: Conn) -> list[str]:
    """Apply every pending migration; return the names applied by this call."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = set(await applied(conn))
        newly: list[str] = []
        for name, sql in available():
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            newly.append(name)
        return newly
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
