"""Single-event appends per second at concurrency 16: our store next to plain asyncpg inserts.

    .venv/bin/python -m bench.append [--events N] [--rounds R] [--concurrency C]

Both sides write the same rows to the same table on a durable server (fsync and
synchronous_commit on), one event per transaction. Rounds alternate store/floor so that noise
from a shared machine hits both; the table shows the median round of each and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bench.common import durable_postgres, machine, median, percentile
from infra.database import create_pool
from infra.eventstore import EventStore
from infra.migrations import migrate
from infra.transcoder import OrjsonTranscoder

TENANT = uuid.uuid4()
STATE = OrjsonTranscoder().encode(
    {"user_name": "someone@contoso.com", "attributes": {"active": True, "displayName": "Some One"}}
)
TOPIC = "domain.user:User.UserProvisioned"
FLOOR_SQL = (
    "INSERT INTO stored_events (originator_id, originator_version, topic, state, tenant_id,"
    " request_id) VALUES ($1, $2, $3, $4, $5, $6)"
)


async def _drive(
    n: int, concurrency: int, one: Callable[[int], Awaitable[None]], tick: Callable[[], None]
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - t0)
            tick()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - started), latencies


async def main(events: int, rounds: int, concurrency: int) -> None:
    console = Console(stderr=True)
    from eventsourcing.persistence import StoredEvent

    with durable_postgres() as dsn:
        pool = await create_pool(dsn, min_size=concurrency, max_size=concurrency)
        async with pool.acquire() as conn:
            await migrate(conn)
            fsync = await conn.fetchval("SHOW fsync")
            sync_commit = await conn.fetchval("SHOW synchronous_commit")
        store = EventStore(pool)

        async def _store_append(i: int) -> None:
            async with pool.acquire() as conn:
                await store.append_stored(
                    conn, TENANT, [StoredEvent(uuid.uuid4(), 1, TOPIC, STATE)], request_id=f"r{i}"
                )

        async def via_asyncpg(i: int) -> None:
            async with pool.acquire() as conn:
                await conn.execute(FLOOR_SQL, uuid.uuid4(), 1, TOPIC, STATE, TENANT, f"r{i}")

        results: dict[str, list[tuple[float, list[float]]]] = {"store": [], "floor": []}
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            for r in range(rounds):
                for name, fn in (("store", _store_append), ("floor", via_asyncpg)):
                    task = progress.add_task(f"round {r + 1} {name}", total=events, rate="")

                    def tick(task: object = task) -> None:
                        progress.advance(task)  # type: ignore[arg-type]

                    rate, lat = await _drive(events, concurrency, fn, tick)
                    progress.update(task, rate=f"{rate:,.0f}/s")  # type: ignore[arg-type]
                    results[name].append((rate, lat))
        await store.close()
        await pool.close()

    table = Table(title=f"Single-event appends, concurrency {concurrency}, {events:,} per round")
    for col in ("path", "median appends/s", "p50 ms", "p99 ms", "rounds (appends/s)"):
        table.add_column(col)
    med: dict[str, float] = {}
    for name, label in (("store", "EventStore.append"), ("floor", "plain asyncpg INSERT")):
        rates = [r for r, _ in results[name]]
        lat = [x for _, sample in results[name] for x in sample]
        med[name] = median(rates)
        table.add_row(
            label,
            f"{med[name]:,.0f}",
            f"{percentile(lat, 50) * 1000:.2f}",
            f"{percentile(lat, 99) * 1000:.2f}",
            ", ".join(f"{x:,.0f}" for x in rates),
        )
    out = Console()
    out.print(table)
    out.print(f"store/floor = {med['store'] / med['floor']:.2f}")
    out.print(f"fsync={fsync} synchronous_commit={sync_commit}; {machine()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.rounds, args.concurrency))
