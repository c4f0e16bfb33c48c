from __future__ import annotations

import asyncio

import asyncpg

from infra.migrations import applied, available, migrate, pending


async def test_concurrent_instances_migrate_once(server_dsn: str) -> None:
    """Four instances starting at once: every migration applied exactly once, no errors."""
    from tests.conftest import with_database

    admin = await asyncpg.connect(server_dsn)
    await admin.execute("DROP DATABASE IF EXISTS migrate_race")
    await admin.execute("CREATE DATABASE migrate_race")
    dsn = with_database(server_dsn, "migrate_race")
    try:
        conns = [await asyncpg.connect(dsn) for _ in range(4)]
        results = await asyncio.gather(*(migrate(c) for c in conns))
        names = [name for name, _ in available()]
        assert sorted(n for r in results for n in r) == names  # each applied by exactly one
        assert await applied(conns[0]) == names
        assert await pending(conns[0]) == []
        assert await migrate(conns[0]) == []  # a later start finds nothing to do
        for c in conns:
            await c.close()
    finally:
        await admin.execute("DROP DATABASE IF EXISTS migrate_race WITH (FORCE)")
        await admin.close()
