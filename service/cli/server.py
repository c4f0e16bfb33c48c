"""Running the service and looking after its database: serve, migrate, doctor."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import click
import orjson

from infra import logging as logsetup
from infra.config import Settings
from infra.ha import failover_checks
from infra.migrations import migrate as run_migrations
from service.cli.common import CliError, database_options, on_connection, run, settings_for


@click.command()
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Port to listen on (default 8000).")
@click.option(
    "--workers",
    envvar="SCIMLEDGER_WORKERS",
    default=None,
    type=click.IntRange(min=1),
    help="Processes sharing the port (SO_REUSEPORT); default one per core. 1: one process.",
)
@database_options
def serve(
    host: str | None,
    port: int | None,
    workers: int | None,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """Serve SCIM at http://HOST:PORT/scim/v2/."""
    # The app (aiohttp, scim2-models) takes a second to import: only `serve` pays for it.
    from service.limits_cpu import bulk_cpu_set
    from service.workers import ListenError, default_workers, serve_workers

    settings = settings_for(data_dir, database_url, host=host, port=port)
    try:  # the bulk process's CPUs (service/limits_cpu.py): a bad list stops us here
        bulk_cpu_set(settings.bulk_cpus, os.sched_getaffinity(0))
    except ValueError as e:
        raise CliError(str(e)) from None
    logsetup.configure()
    count = workers or default_workers()
    try:
        run(lambda: _serve(settings) if count == 1 else serve_workers(settings, count))
    except ListenError as e:
        raise CliError(str(e)) from None


async def _serve(settings: Settings) -> None:
    """One process: the app, which owns its pool, supervisor and projection runners."""
    from service.app import create_app
    from service.state import ISSUED_TOKEN
    from service.workers import listen, print_banner

    app = create_app(settings, role="process")
    # Handlers first: a SIGTERM that arrives once the banner is out must stop us cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = await listen(app, settings)  # sets the app up: its cleanup contexts open
    print_banner(settings, app.get(ISSUED_TOKEN))
    try:
        await stop.wait()
    finally:
        # Stops accepting, then waits for in-flight requests before the pool closes.
        await runner.cleanup()


@click.command()
@database_options
def migrate(data_dir: Path | None, database_url: str | None) -> None:
    """Apply pending database migrations."""
    settings = settings_for(data_dir, database_url)
    applied = on_connection(settings, run_migrations, run_migrations=False)
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))


@click.command()
@click.option("--json", "json_output", is_flag=True, help="One JSON object per check.")
@database_options
def doctor(json_output: bool, data_dir: Path | None, database_url: str | None) -> None:
    """Check the database for failover safety (synchronous_commit, the standby, prepared
    transactions in doubt). Exit 1 if a check fails."""
    settings = settings_for(data_dir, database_url)
    checks = on_connection(settings, failover_checks, run_migrations=False)
    for check in checks:
        if json_output:
            print(orjson.dumps(check.as_dict()).decode())
        else:
            print(f"{'ok  ' if check.ok else 'WARN'}  {check.name}: {check.detail}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise CliError(f"not safe for a failover: {', '.join(failed)}")


COMMANDS = [serve, migrate, doctor]
