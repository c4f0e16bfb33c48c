"""Row (5): `scimledger projections rebuild --all` over bench.history's tenant histories, three
runs as a subprocess: views stale, `--dry-run` (no drift expected), views current (the row).

    .venv/bin/python -m bench.rebuild [--events N] [--runs N] [--sealed]

runs it alone, in clear or (--sealed) after `scimledger erase migrate`, from this checkout or
(--code DIR) another one, e.g. a revision from before issue 17; each run's rate and the median.
The row of the table seals the events unless the code under test predates sealing: issue 17's
target is a sealed ledger's rebuild against the earlier code's over the same ledger in clear."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import psutil
from rich.progress import Progress

from bench.common import (
    CHILD,
    ROOT,
    SCIMLEDGER,
    BenchError,
    Cpu,
    connected,
    durable_postgres,
    machine_busy,
    make_database,
    median,
    postgres_facts,
    progress_bar,
    tree_cpu,
    verdict,
)
from bench.history import seed
from bench.table import Ctx, Row
from infra.config import Settings
from infra.database import open_database
from infra.keys import MASTER_ENV
from projections.registry import PROJECTIONS
from projections.runner import Runner
from projections.state import register
from service.erasure import migrate_all

TARGET = 50_000  # events/s, events x projections / seconds (the goal)
TENANT_EVENTS = 50_000
CHUNK = 5000
REPORT = re.compile(r"^(\w+): (\d+) events in ([\d.]+)s \(([\d,]+) events/s[;)]")
DIFF = re.compile(r"^  (\w+): (\d+) added, (\d+) removed, (\d+) changed")


async def catch_up(dsn: str, names: list[str], progress: Progress) -> None:
    """Bring projections to the head with their own runner's step, as `serve` would."""
    async with open_database(Settings(database_url=dsn, run_projections=False)) as db:
        conn = await db.connect()
        try:
            await register(conn, list(PROJECTIONS.values()))
            for name in names:
                runner = Runner(db, PROJECTIONS[name], batch_size=5000)
                task = progress.add_task(f"{name} runner catch-up", total=None, rate="")
                while await runner.step(conn):
                    progress.update(task, completed=runner.applied)
                progress.update(task, total=runner.applied)
        finally:
            await conn.close()


def high_water(pid: int) -> int:
    """VmHWM: the peak RSS of the process since its exec (0 if unknown). Not `wait4`'s
    ru_maxrss: a child created by fork inherits the parent's high-water mark through exec."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Run:
    seconds: float
    peak_rss: int  # bytes: the sum of the VmHWM of the command and of its workers
    cpu: float
    postgres_cpu: float | None
    other_cpu: float | None  # CPU seconds of everything else on the machine meanwhile
    events: int  # events x projections
    output: str
    drift: bool


def run_command(dsn: str, size: int, *, dry_run: bool) -> tuple[Run, float]:
    """One `scimledger projections rebuild --all --quiet` subprocess, watched; the machine's
    busy CPU before it (PostgreSQL's is read once its backends are gone)."""
    cmd = [str(SCIMLEDGER), "projections", "rebuild", "--all", "--quiet", "--database-url", dsn]
    cmd += ["--dry-run"] if dry_run else []
    busy0 = machine_busy()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=errors, start_new_session=True, **CHILD)
        marks: dict[int, int] = {}  # pid -> its VmHWM, the command's and its workers'
        try:
            watched = psutil.Process(proc.pid)
            while True:
                # wait4 reaps the child and returns its rusage: its own CPU and that of the
                # children it reaped (the CLI forks its workers and joins them).
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    seconds = time.perf_counter() - started
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    break
                with contextlib.suppress(psutil.Error):
                    for member in [watched, *watched.children(recursive=True)]:
                        marks[member.pid] = max(marks.get(member.pid, 0), high_water(member.pid))
                time.sleep(0.05)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        out.seek(0)
        errors.seek(0)
        text = out.read().decode(errors="replace")
        problems = errors.read().decode(errors="replace")
        if proc.returncode != 0:
            failed = f"{' '.join(cmd[:5])} exited with {proc.returncode}"
            raise BenchError(f"{failed}:\n{text}\n{problems}")
    replayed = {m[1]: int(m[2]) for line in text.splitlines() if (m := REPORT.match(line))}
    if set(replayed) != set(PROJECTIONS) or set(replayed.values()) != {size}:
        raise BenchError(f"expected every projection to replay {size:,} events, got:\n{text}")
    changed = [m.groups()[1:] for line in text.splitlines() if (m := DIFF.match(line))]
    drift = any(int(x) for counts in changed for x in counts)
    cpu = usage.ru_utime + usage.ru_stime
    run = Run(seconds, sum(marks.values()), cpu, None, None, sum(replayed.values()), text, drift)
    return run, busy0


async def measured(dsn: str, size: int, postmaster: psutil.Process | None, dry_run: bool) -> Run:
    pg0 = tree_cpu(postmaster) if postmaster is not None else None
    run, busy0 = await asyncio.to_thread(run_command, dsn, size, dry_run=dry_run)
    if postmaster is not None and pg0 is not None:
        # until the rebuild's backends have exited (and their CPU was accounted)
        async with connected(dsn) as conn:
            for _ in range(200):
                if not await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                ):
                    break
                await asyncio.sleep(0.05)
        run.postgres_cpu = tree_cpu(postmaster) - pg0
        run.other_cpu = max(0.0, machine_busy() - busy0 - run.cpu - run.postgres_cpu)
    return run


def seals(code: Path | None) -> bool:
    """Can the code under test (a checkout on PYTHONPATH, else this one) read sealed events?
    A revision from before issue 17 cannot: its rows measure the same ledger in clear."""
    return ((code or ROOT) / "infra" / "sealing.py").exists()


def code_under_test() -> Path | None:
    path = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    return Path(path) if path else None


async def seeded(dsn: str, n: int, progress: Progress, *, sealed: bool) -> int:
    """bench.history's tenant histories (events only), sealed if `sealed` (`scimledger erase
    migrate`: what a ledger written with encryption holds), the asynchronous projections caught
    up (their rebuild replays up to their live checkpoint); the events stored."""
    budgets = [TENANT_EVENTS] * (n // TENANT_EVENTS) + [n % TENANT_EVENTS] * bool(n % TENANT_EVENTS)
    histories = await seed(dsn, budgets, progress, recorded=False, chunk=CHUNK)
    n = sum(h.emitted for _, h in histories)
    if sealed:
        task = progress.add_task("erase migrate (seal the events)", total=None, rate="")
        async with open_database(Settings(database_url=dsn, run_projections=False)) as db:
            done = await migrate_all(db)
        progress.update(task, total=done, completed=done)
    async with connected(dsn) as conn:
        if (stored := await conn.fetchval("SELECT count(*) FROM stored_events")) != n:
            raise BenchError(f"seeded {n:,} events but the store holds {stored:,}")
        # What autovacuum would have done by now; and no checkpoint due mid-run.
        await conn.execute("VACUUM ANALYZE stored_events")
        await conn.execute("CHECKPOINT")
    await catch_up(dsn, [p.name for p in PROJECTIONS.values() if p.mode == "async"], progress)
    return n


async def rebuild(ctx: Ctx) -> None:
    """(5) the rebuild of every projection, views current, on a database of its own."""
    dsn = await make_database(ctx.dsn, "bench_rebuild")
    code = code_under_test()
    sealed = seals(code)
    # One master key for the sealing here and the rebuilds it starts.
    os.environ.setdefault(MASTER_ENV, base64.b64encode(os.urandom(32)).decode())
    with progress_bar() as progress:
        n = await seeded(dsn, ctx.sizes.rebuild_events, progress, sealed=sealed)
        for label, dry_run in (("views stale", False), ("--dry-run", True), ("current", False)):
            task = progress.add_task(f"rebuild {n:,} events ({label})", total=None, rate="")
            run = await measured(dsn, n, ctx.postmaster, dry_run)
            progress.update(task, total=1, completed=1, rate=f"{run.events / run.seconds:,.0f}/s")
            if dry_run and run.drift:
                raise BenchError(f"a dry run right after a rebuild found drift:\n{run.output}")
    rate, cores = run.events / run.seconds, Cpu(seconds=run.seconds).cores
    ctx.add(Row("5", "projection rebuild, every projection (bench.rebuild, views current)",
        f"{n:,} events",
        f"{rate:,.0f} events/s; peak RSS {run.peak_rss / 2**20:,.0f} MB; {run.seconds:.1f} s",
        "", f"≥ {TARGET:,} events/s", verdict(rate >= TARGET), f"rebuild {cores(run.cpu)} /"
        f" postgres {cores(run.postgres_cpu)} / other {cores(run.other_cpu)}"))  # fmt: skip
    ledger = (
        "sealed (`erase migrate`: the personal values encrypted, as a ledger written since"
        " issue 17 holds them)"
        if sealed
        else f"in clear (the code under test, {code}, predates sealing: issue 17's target"
        " compares a sealed ledger with this)"
    )
    ctx.notes.append(
        "(5) events x projections / wall seconds of `projections rebuild --all` (start-up"
        f" included), over bench.history's tenant histories, their events {ledger}"
    )


async def alone(dsn: str, events: int, runs: int, sealed: bool) -> None:
    postmaster, _ = await postgres_facts(dsn)
    with progress_bar() as progress:
        n = await seeded(dsn, events, progress, sealed=sealed)
    rates = []
    for i in range(runs):
        got = await measured(dsn, n, postmaster, dry_run=False)
        rates.append(got.events / got.seconds)
        print(f"run {i + 1}: {rates[-1]:,.0f} events/s; CPU {got.cpu:.1f} s")
    print(f"{n:,} events, {'sealed' if sealed else 'clear'}: median {median(rates):,.0f} events/s")


@click.command(help="The rebuild of every projection, alone: each run's rate and the median.")
@click.option("--events", default=100_000, show_default=True)
@click.option("--runs", default=3, show_default=True)
@click.option("--sealed", is_flag=True, help="`erase migrate` before the runs.")
@click.option(
    "--code",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Run the rebuilds from this checkout (PYTHONPATH), e.g. an older revision.",
)
def main(events: int, runs: int, sealed: bool, code: Path | None) -> None:
    if sealed and not seals(code):
        raise click.UsageError(f"{code} predates sealing: it cannot read sealed events")
    if code is not None:
        os.environ["PYTHONPATH"] = str(code.resolve())
    # One master key for this process and the rebuilds it starts.
    os.environ.setdefault(MASTER_ENV, base64.b64encode(os.urandom(32)).decode())
    with durable_postgres() as dsn:
        asyncio.run(alone(dsn, events, runs, sealed))


if __name__ == "__main__":
    main()
