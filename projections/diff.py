"""What a rebuild changes: the shadow table against the live one, row by row."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from infra.eventstore import Conn
from projections.registry import Projection
from projections.shadow import primary_key, shadow_of

SAMPLES = 5


@dataclass
class TableDiff:
    table: str
    added: int = 0
    removed: int = 0
    changed: int = 0
    samples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def drift(self) -> bool:
        return bool(self.added or self.removed or self.changed)



async def diff(conn: Conn, projection: Projection, table: str) -> TableDiff:
    """Rows the shadow adds, removes and changes compared with the live table.

    One pass over both (a full join on the primary key, rows compared column by column);
    samples only for the kinds that occur.
    """
    shadow = shadow_of(table)
    _, keys = await primary_key(conn, table)
    on = " AND ".join(f"s.{k} = l.{k}" for k in keys)
    key = keys[0]
    result = TableDiff(table)
    counts = await conn.fetchrow(
        f"SELECT count(*) FILTER (WHERE l.{key} IS NULL) AS added,"
        f" count(*) FILTER (WHERE s.{key} IS NULL) AS removed,"
        f" count(*) FILTER (WHERE s.{key} IS NOT NULL AND l.{key} IS NOT NULL"
        f" AND ROW(s.*) IS DISTINCT FROM ROW(l.*)) AS changed"
        f" FROM {shadow} s FULL JOIN {table} l ON {on}"
    )
    assert counts is not None
    samples = {
        "added": f"SELECT to_jsonb(s) AS r FROM {shadow} s LEFT JOIN {table} l ON {on}"
        f" WHERE l.{key} IS NULL",
        "removed": f"SELECT to_jsonb(l) AS r FROM {table} l LEFT JOIN {shadow} s ON {on}"
        f" WHERE s.{key} IS NULL",
        "changed": f"SELECT to_jsonb(s) AS r, to_jsonb(l) AS o FROM {shadow} s JOIN {table} l"
        f" ON {on} WHERE ROW(s.*) IS DISTINCT FROM ROW(l.*)",
    }
    for kind, sql in samples.items():
        count = int(counts[kind])
        setattr(result, kind, count)
        if count:
            rows = await conn.fetch(f"{sql} LIMIT {SAMPLES}")
            result.samples[kind] = [_sample(projection, table, kind, row) for row in rows]
    return result


def _sample(projection: Projection, table: str, kind: str, row: asyncpg.Record) -> str:
    new = row["r"]
    label = projection.describe(table, new)
    if kind != "changed":
        return label
    old = row["o"]
    fields = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
    details = []
    for key in fields:
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            inner = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            details.append(f"{key}: {', '.join(inner)}")
        else:
            details.append(key)
    return f"{label}: {'; '.join(details)}"
