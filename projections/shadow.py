"""Shadow tables: where a rebuild replays a projection beside its live tables.

`<table>__rebuild` has the live table's columns and primary key; its secondary indexes are built
once, after the bulk load; the swap gives it the live table's name and index names.
"""

from __future__ import annotations

import re

from infra.eventstore import Conn

SUFFIX = "__rebuild"


def shadow_of(table: str) -> str:
    return table + SUFFIX


async def primary_key(conn: Conn, table: str) -> tuple[str, list[str]]:
    row = await conn.fetchrow(
        """
        SELECT c.conname, array_agg(a.attname ORDER BY k.ord) AS cols
        FROM pg_constraint c
        CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k (attnum, ord)
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
        WHERE c.conrelid = $1::regclass AND c.contype = 'p'
        GROUP BY c.conname
        """,
        table,
    )
    assert row is not None, f"{table} has no primary key"
    return row["conname"], list(row["cols"])


async def _secondary_indexes(conn: Conn, table: str) -> list[tuple[str, str]]:
    rows = await conn.fetch(
        """
        SELECT i.relname AS name, pg_get_indexdef(x.indexrelid) AS def
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        WHERE x.indrelid = $1::regclass AND NOT x.indisprimary
        ORDER BY i.relname
        """,
        table,
    )
    return [(r["name"], r["def"]) for r in rows]


async def create_shadow(conn: Conn, table: str) -> None:
    shadow = shadow_of(table)
    pk_name, pk_cols = await primary_key(conn, table)
    await conn.execute(f"DROP TABLE IF EXISTS {shadow}")
    await conn.execute(
        f"CREATE TABLE {shadow} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )
    await conn.execute(
        f"ALTER TABLE {shadow} ADD CONSTRAINT {pk_name}{SUFFIX} PRIMARY KEY ({', '.join(pk_cols)})"
    )


async def index_shadow(conn: Conn, table: str) -> None:
    shadow = shadow_of(table)
    for name, definition in await _secondary_indexes(conn, table):
        shadow_def = re.sub(
            r"INDEX (\S+) ON (\S+) ",
            f"INDEX {name}{SUFFIX} ON {shadow} ",
            definition,
            count=1,
        )
        await conn.execute(shadow_def)


async def swap_in(conn: Conn, table: str) -> None:
    """Inside the caller's transaction: the shadow takes the live table's name and index names."""
    shadow = shadow_of(table)
    pk_name, _ = await primary_key(conn, table)
    indexes = [name for name, _ in await _secondary_indexes(conn, table)]
    await conn.execute(f"DROP TABLE {table}")
    await conn.execute(f"ALTER TABLE {shadow} RENAME TO {table}")
    await conn.execute(f"ALTER TABLE {table} RENAME CONSTRAINT {pk_name}{SUFFIX} TO {pk_name}")
    for name in indexes:
        await conn.execute(f"ALTER INDEX {name}{SUFFIX} RENAME TO {name}")


async def drop_shadow(conn: Conn, table: str) -> None:
    await conn.execute(f"DROP TABLE IF EXISTS {shadow_of(table)}")
