"""The Entra initial cycle of `make bench` (row 4) alone, to compare commits or connections.

    .venv/bin/python -m bench.cycle [--users N --groups G --members M] [--connections C ...]
                                    [--code DIR]

Starts a durable embedded PostgreSQL and `scimledger serve` (from DIR with --code, as
bench.profile_server does), then runs the cycle once per --connections value, each on a tenant
of its own, and prints its time, rate and CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import psutil

from bench.suite import CONCURRENCY, Meter, entra_cycle, progress_bar
from bench.users import Served, create_tenant, free_port, postgres_facts, served, wait_ready


async def _run(s: Served, origin: str, sizes: tuple[int, int, int], widths: list[int]) -> None:
    postmaster, _ = await postgres_facts(s.dsn)
    meter = Meter(psutil.Process(s.proc.pid), postmaster)
    connector = aiohttp.TCPConnector(limit=max(CONCURRENCY, *widths))
    async with aiohttp.ClientSession(connector=connector) as session:
        await wait_ready(session, origin, s.proc, s.log)
        for width in widths:
            base = f"{origin}/scim/v2"
            with progress_bar() as progress:
                result = await entra_cycle(
                    session, base, create_tenant(s.dsn), sizes, meter, progress, width
                )
            c = result.cpu
            print(
                f"{width} connections: {c.seconds:.1f} s, {result.requests:,} requests,"
                f" {result.requests / c.seconds:,.0f} req/s ({result.phase_text()});"
                f" CPU {c.text()}",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--members", type=int, default=5_000)
    parser.add_argument("--connections", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--code", type=Path, help="run the server from this checkout")
    ns = parser.parse_args(argv)
    if ns.code is not None:
        os.environ["PYTHONPATH"] = str(ns.code.resolve())
    port = free_port()
    import uvloop

    with served(port, "bench-cycle-") as s:
        uvloop.run(
            _run(s, f"http://127.0.0.1:{port}", (ns.users, ns.groups, ns.members), ns.connections)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
