"""Issue 17's cost on replay: `projections rebuild --all` over bench.rebuild's store, in clear
or (--sealed) after `scimledger erase migrate`; each run's rate and the median."""

from __future__ import annotations

import asyncio
import base64
import os

import click

from bench.common import connected, durable_postgres, median, postgres_facts, progress_bar
from bench.rebuild import measured, seeded
from infra.config import Settings
from infra.database import open_database
from service.erasure import migrate_all


async def run(dsn: str, events: int, runs: int, sealed: bool) -> None:
    postmaster, _ = await postgres_facts(dsn)
    with progress_bar() as progress:
        n = await seeded(dsn, events, progress)
    if sealed:
        async with open_database(Settings(database_url=dsn, run_projections=False)) as db:
            print(f"sealed {await migrate_all(db):,} events in place")
        async with connected(dsn) as conn:
            await conn.execute("VACUUM ANALYZE stored_events")
    rates = []
    for i in range(runs):
        got = await measured(dsn, n, postmaster, dry_run=False)
        rates.append(got.events / got.seconds)
        print(f"run {i + 1}: {rates[-1]:,.0f} events/s; CPU {got.cpu:.1f} s")
    kind = "sealed" if sealed else "clear"
    print(f"{n:,} events, {kind}: median {median(rates):,.0f} events/s")


@click.command(help=(__doc__ or "").splitlines()[0])
@click.option("--events", default=100_000, show_default=True)
@click.option("--runs", default=3, show_default=True)
@click.option("--sealed", is_flag=True, help="`erase migrate` before the runs.")
def main(events: int, runs: int, sealed: bool) -> None:
    # One master key for this process and the rebuilds it starts.
    os.environ.setdefault("SCIMLEDGER_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    with durable_postgres() as dsn:
        asyncio.run(run(dsn, events, runs, sealed))


if __name__ == "__main__":
    main()
