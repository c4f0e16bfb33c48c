"""`scimledger projections`: status, rebuild from the event store, verify against a rebuild."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from infra.config import Settings
from infra.database import Database
from projections import parallel
from projections.rebuild import Rebuilder, RebuildReport
from projections.registry import PROJECTIONS, Projection
from projections.state import register, status
from service.cli.common import CliError, F, database_options, on_database, settings_for


@click.group()
def projections() -> None:
    """Read models: status, rebuild from the event store, verify against a rebuild."""


def _selected(name: str | None, all_: bool) -> list[Projection]:
    if all_ == (name is not None):
        raise click.UsageError("name one projection or pass --all")
    if name is None:
        return list(PROJECTIONS.values())
    if name not in PROJECTIONS:
        raise click.UsageError(f"unknown projection {name!r} (known: {', '.join(PROJECTIONS)})")
    return [PROJECTIONS[name]]


@projections.command("status")
@click.option("--json", "json_output", is_flag=True, help="Print JSON lines.")
@database_options
def projections_status(json_output: bool, data_dir: Path | None, database_url: str | None) -> None:
    """Name, version, checkpoint, events behind, last error of every projection."""
    settings = settings_for(data_dir, database_url)

    async def go(db: Database) -> list[dict[str, Any]]:
        async with db.pool.acquire() as conn:
            await register(conn, list(PROJECTIONS.values()))
        return await status(db, list(PROJECTIONS.values()))

    rows = on_database(settings, go)
    if json_output:
        for row in rows:
            print(orjson.dumps(row).decode())
        return
    table = Table("name", "mode", "version", "checkpoint", "behind", "rebuilt", "last error")
    for row in rows:
        version = str(row["version"])
        if row["needs_rebuild"]:
            version += f" (stored {row['stored_version']}: rebuild due)"
        table.add_row(
            row["name"],
            row["mode"],
            version,
            str(row["checkpoint"]),
            str(row["events_behind"]),
            row["rebuilt_at"] or "-",
            row["last_error"] or "-",
        )
    Console().print(table)


def _rebuild(
    settings: Settings,
    selected: list[Projection],
    dry_run: bool,
    quiet: bool,
    jobs: int | None = None,
) -> list[RebuildReport]:
    """Rebuild the selected projections, each with its progress bar; several side by side in
    processes of their own (`jobs`, default one per core) when more than one is selected."""
    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    side_by_side = len(selected) > 1 and jobs > 1
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} events/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=quiet,
        # Side by side, the workers are forked from this process: no refresh thread then,
        # the bar is redrawn on their progress messages instead.
        auto_refresh=not side_by_side,
    )
    tasks = {p.name: bar.add_task(p.name, total=None, rate="-") for p in selected}
    started: dict[str, float] = {}

    def tick(name: str, done: int, total: int) -> None:
        t0 = started.setdefault(name, time.perf_counter())
        rate = done / max(time.perf_counter() - t0, 1e-9)
        bar.update(tasks[name], completed=done, total=total, rate=f"{rate:,.0f}")
        if side_by_side:
            bar.refresh()

    if side_by_side:
        with bar:
            results = parallel.run(
                settings, [p.name for p in selected], dry_run=dry_run, jobs=jobs, tick=tick
            )
        reports = [r for r in results if not isinstance(r, parallel.Failed)]
        failed = [r for r in results if isinstance(r, parallel.Failed)]
        if failed:
            _print_reports(reports, swapped_word="swapped in")
            raise CliError(
                "; ".join(f"{f.name} failed (live view untouched): {f.error}" for f in failed)
            )
        return reports

    async def go(db: Database) -> list[RebuildReport]:
        reports = []
        with bar:
            for projection in selected:
                started[projection.name] = time.perf_counter()

                def progress(done: int, total: int, name: str = projection.name) -> None:
                    tick(name, done, total)

                rebuilder = Rebuilder(db, projection, progress=progress)
                reports.append(await rebuilder.run(dry_run=dry_run))
        return reports

    return on_database(settings, go)


def _print_reports(reports: list[RebuildReport], *, swapped_word: str) -> None:
    for report in reports:
        rate = report.events / max(report.seconds, 1e-9)
        state = swapped_word if report.swapped else "not swapped (dry run)"
        print(
            f"{report.name}: {report.events} events in {report.seconds:.2f}s "
            f"({rate:,.0f} events/s; CPU {report.cpu_seconds:.2f}s,"
            f" peak RSS {report.peak_rss / 2**20:,.0f} MB), {state}"
        )
        for d in report.diffs:
            print(f"  {d.table}: {d.added} added, {d.removed} removed, {d.changed} changed")
            for kind, samples in d.samples.items():
                for sample in samples:
                    print(f"    {kind}: {sample}")


def _jobs_option(fn: F) -> F:
    return click.option(
        "--jobs",
        type=click.IntRange(min=1),
        default=None,
        help="Projections rebuilt side by side, each in its own process (default: one per core).",
    )(fn)


@projections.command("rebuild")
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Rebuild every projection.")
@click.option("--dry-run", is_flag=True, help="Build and compare with the live view; no swap.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_jobs_option
@database_options
def projections_rebuild(
    name: str | None,
    all_: bool,
    dry_run: bool,
    quiet: bool,
    jobs: int | None,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """Rebuild from position 0 into shadow tables, catch up, swap atomically."""
    selected = _selected(name, all_)
    reports = _rebuild(settings_for(data_dir, database_url), selected, dry_run, quiet, jobs)
    _print_reports(reports, swapped_word="swapped in")


@projections.command("verify")
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Verify every projection.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_jobs_option
@database_options
def projections_verify(
    name: str | None,
    all_: bool,
    quiet: bool,
    jobs: int | None,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """Rebuild into a shadow and compare with the live view; exit 1 on any drift."""
    selected = _selected(name, all_)
    reports = _rebuild(settings_for(data_dir, database_url), selected, True, quiet, jobs)
    _print_reports(reports, swapped_word="swapped in")
    drift = [r.name for r in reports if r.drift]
    if drift:
        raise CliError(f"drift in {', '.join(drift)}")
    print("no drift")
