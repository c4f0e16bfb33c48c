"""Issue 17's cost on replay: `projections rebuild --all` over the same kind of store, in clear
(as stored before encryption) and sealed (after `scimledger erase migrate`, as every event is
stored now).

    .venv/bin/python -m bench.erasure [--events N] [--runs N] [--sealed]

Seeds like bench.rebuild (its generator and writers), catches the asynchronous projections up,
then times `--runs` rebuilds with views current and prints each rate and the median. Run it on
the commit before the issue (clear only) and on this one (clear, then --sealed) for the
before/after rows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
from collections.abc import Sequence

from rich.progress import Progress

from bench.common import durable_postgres
from bench.rebuild import Seeded, _prepare, catch_up_async, measure, postmaster_of, seed


async def _seal(dsn: str) -> int:
    from infra.config import Settings
    from infra.database import open_database
    from service.erasure import migrate_all

    async with open_database(Settings(database_url=dsn, run_projections=False)) as db:
        return await migrate_all(db)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sealed", action="store_true", help="erase migrate before the runs")
    ns = parser.parse_args(argv)
    # One master key for this process and the rebuilds it starts.
    os.environ.setdefault("SCIMLEDGER_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    with durable_postgres() as dsn:
        seeded = Seeded()

        async def grow() -> None:
            pool = await _prepare(dsn)
            try:
                with Progress() as progress:
                    await seed(pool, seeded, ns.events, 50_000, 2, 5000, progress)
                async with pool.acquire() as conn:
                    await conn.execute("VACUUM ANALYZE stored_events")
            finally:
                await pool.close()

        asyncio.run(grow())
        if ns.sealed:
            print(f"sealed {asyncio.run(_seal(dsn)):,} events in place")
            asyncio.run(_vacuum(dsn))
        with Progress() as progress:
            asyncio.run(catch_up_async(dsn, progress))
        postmaster, _ = asyncio.run(postmaster_of(dsn))
        rates = []
        for i in range(ns.runs):
            run = measure(dsn, seeded.events, "rebuild", postmaster, dry_run=False)
            rates.append(run.rate)
            per = ", ".join(f"{k} {r:,.0f}" for k, (_, _, r) in run.projections.items())
            print(f"run {i + 1}: {run.rate:,.0f} events/s ({per}); CPU {run.cpu:.1f}s")
        kind = "sealed" if ns.sealed else "clear"
        print(f"{seeded.events:,} events, {kind}: median {statistics.median(rates):,.0f} events/s")
    return 0


async def _vacuum(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM ANALYZE stored_events")
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(main())
