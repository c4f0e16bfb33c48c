"""Row (5): `scimledger projections rebuild --all` over bench.history's tenant histories, as a
subprocess: views stale, `--dry-run` (no drift expected), then views current (the row), e.g.

    .venv/bin/python -m bench.suite --quick --only rebuild --set rebuild_runs=3 [--code DIR]

for the median of three runs from another checkout (a revision from before issue 17 measures
the same ledger in clear); `--set rebuild_sealed=0` rebuilds it in clear, `--set
rebuild_events=N` sets its size."""

from __future__ import annotations

import asyncio
import base64
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from bench.common import (
    PROGRESS,
    ROOT,
    SCIMLEDGER,
    BenchError,
    Cpu,
    Finished,
    Meter,
    connected,
    finished,
    make_database,
)
from bench.history import catch_up, seed, settle
from bench.table import Ctx, Row, verdict
from infra.config import Settings
from infra.database import open_database
from infra.keys import MASTER_ENV
from projections.registry import PROJECTIONS
from service.erasure import migrate_all

TARGET = 50_000  # events/s, events x projections / seconds (the goal)
TENANT_EVENTS = 50_000
CHUNK = 5000
REPORT = re.compile(r"^(\w+): (\d+) events in ([\d.]+)s \(([\d,]+) events/s[;)]")
DIFF = re.compile(r"^  (\w+): (\d+) added, (\d+) removed, (\d+) changed")


@dataclass
class Run:
    done: Finished
    cpu: Cpu  # the rebuild's (as the client's), PostgreSQL's and the machine's, its wall seconds
    events: int  # events x projections
    drift: bool

    @property
    def rate(self) -> float:
        return self.events / self.done.seconds


async def measured(dsn: str, size: int, postmaster: psutil.Process | None, dry_run: bool) -> Run:
    """One `scimledger projections rebuild --all --quiet` subprocess, watched; PostgreSQL's CPU
    is read once the rebuild's backends are gone (and their CPU was accounted)."""
    cmd = [str(SCIMLEDGER), "projections", "rebuild", "--all", "--quiet", "--database-url", dsn]
    meter, cmd = Meter(None, postmaster), cmd + ["--dry-run"] * dry_run
    before = meter.read()
    done = await asyncio.to_thread(finished, cmd, watch=True, session=True)
    async with connected(dsn) as conn:
        for _ in range(200):
            if not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ):
                break
            await asyncio.sleep(0.05)
    cpu = replace(meter.since(before, extra=done.cpu), seconds=done.seconds)
    lines = done.out.splitlines()
    replayed = {m[1]: int(m[2]) for line in lines if (m := REPORT.match(line))}
    if set(replayed) != set(PROJECTIONS) or set(replayed.values()) != {size}:
        raise BenchError(f"expected every projection to replay {size:,} events, got:\n{done.out}")
    drift = any(int(x) for line in lines if (m := DIFF.match(line)) for x in m.groups()[1:])
    return Run(done, cpu, sum(replayed.values()), drift)


async def seeded(dsn: str, n: int, *, sealed: bool) -> int:
    """bench.history's tenant histories (events only), sealed if `sealed` (`scimledger erase
    migrate`: what a ledger written with encryption holds), the asynchronous projections caught
    up (their rebuild replays up to their live checkpoint); the events stored."""
    tenants = -(-n // TENANT_EVENTS)
    histories = await seed(dsn, n, tenants, recorded=False, chunk=CHUNK)
    n = sum(h.emitted for _, h in histories)
    if sealed:
        task = PROGRESS.add_task("erase migrate (seal the events)", total=None)
        async with open_database(Settings(database_url=dsn, run_projections=False)) as db:
            done = await migrate_all(db)
        PROGRESS.update(task, total=done, completed=done)
    async with connected(dsn) as conn:
        if (stored := await conn.fetchval("SELECT count(*) FROM stored_events")) != n:
            raise BenchError(f"seeded {n:,} events but the store holds {stored:,}")
        await settle(conn)
    await catch_up(dsn, [p.name for p in PROJECTIONS.values() if p.mode == "async"])
    return n


async def rebuild(ctx: Ctx) -> None:
    """(5) the rebuild of every projection, views current, on a database of its own: the
    median of `rebuild_runs` runs (`--set rebuild_runs=N`), after a run with the views stale
    and a dry run; sealed unless `--set rebuild_sealed=0` or the code under test predates
    sealing (issue 17's target compares a sealed ledger with that code's over one in clear)."""
    dsn = await make_database(ctx.dsn, "bench_rebuild")
    code = Path(os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or ROOT)
    can_seal = (code / "infra" / "sealing.py").exists()
    sealed = ctx.sizes.rebuild_sealed and can_seal
    # One master key for the sealing here and the rebuilds it starts.
    os.environ.setdefault(MASTER_ENV, base64.b64encode(os.urandom(32)).decode())
    runs: list[Run] = []
    n = await seeded(dsn, ctx.sizes.rebuild_events, sealed=sealed)
    current = [("current", False)] * ctx.sizes.rebuild_runs
    for label, dry_run in [("views stale", False), ("--dry-run", True), *current]:
        task = PROGRESS.add_task(f"rebuild {n:,} events ({label})", total=None)
        run = await measured(dsn, n, ctx.postmaster, dry_run)
        done = f"rebuild {n:,} events ({label}): {run.rate:,.0f}/s"
        PROGRESS.update(task, total=1, completed=1, description=done)
        if dry_run and run.drift:
            raise BenchError(f"a dry run right after a rebuild found drift:\n{run.done.out}")
        runs += [run] if label == "current" else []
    runs.sort(key=lambda r: r.rate)
    run, rates = runs[len(runs) // 2], [r.rate for r in runs]
    seconds, rate, cpu = run.done.seconds, run.rate, run.cpu
    ctx.add(Row("5", "projection rebuild, every projection (bench.rebuild, views current)",
        f"{n:,} events",
        f"{rate:,.0f} events/s; peak RSS {run.done.peak_rss / 2**20:,.0f} MB; {seconds:.1f} s",
        "", f"≥ {TARGET:,} events/s", verdict(rate >= TARGET), f"rebuild {cpu.cores(cpu.client)} /"
        f" postgres {cpu.cores(cpu.postgres)} / other {cpu.cores(cpu.others)}"))  # fmt: skip
    ledger = (
        "sealed (`erase migrate`: the personal values encrypted, as a ledger written since"
        " issue 17 holds them)"
        if sealed
        else "in clear (`--set rebuild_sealed=0`)"
        if can_seal
        else f"in clear (the code under test, {code}, predates sealing: issue 17's target"
        " compares a sealed ledger with this)"
    )
    each = f"; the median of {len(rates)} runs: {', '.join(f'{r:,.0f}' for r in rates)} events/s"
    ctx.notes.append(
        "(5) events x projections / wall seconds of `projections rebuild --all` (start-up"
        f" included), over bench.history's tenant histories, their events {ledger}"
        + (each if len(rates) > 1 else "")
    )
