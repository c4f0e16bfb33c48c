"""The `scimledger` command: serve, migrate, tenants.

Every command takes --data-dir / SCIMLEDGER_DATA_DIR and --database-url / DATABASE_URL and so
reaches the same database as a `serve` running on that data directory.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from infra import logging as logsetup
from infra.config import Settings
from infra.database import DatabaseUnavailable, open_database
from infra.migrations import migrate as run_migrations
from infra.tenants import TenantExists, UnknownTenant, create_tenant, list_tenants

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """A failure to report on one line with exit code 1."""


def database_options(fn: F) -> F:
    fn = click.option(
        "--database-url",
        envvar="DATABASE_URL",
        default=None,
        help="postgresql:// URL of an external server instead of the embedded one.",
    )(fn)
    fn = click.option(
        "--data-dir",
        envvar="SCIMLEDGER_DATA_DIR",
        default=None,
        type=click.Path(file_okay=False, path_type=Path),
        help="Data directory of the embedded PostgreSQL (default ./var).",
    )(fn)
    return fn


def _settings(data_dir: Path | None, database_url: str | None, **kw: Any) -> Settings:
    changes: dict[str, Any] = {k: v for k, v in kw.items() if v is not None}
    if data_dir is not None:
        changes["data_dir"] = data_dir
    if database_url:
        changes["database_url"] = database_url
    return replace(Settings(), **changes)


def _on_connection(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(conn)` on a pooled connection of the database these settings name."""

    async def go() -> T:
        async with open_database(settings) as db, db.pool.acquire() as conn:
            return await work(conn)

    return _run(go)


def _on_database(settings: Settings, work: Callable[[Any, Any], Awaitable[T]]) -> T:
    """Run `work(database, conn)`: for commands that append events (to `database.store`)."""

    async def go() -> T:
        async with open_database(settings) as db, db.pool.acquire() as conn:
            return await work(db, conn)

    return _run(go)


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    import uvloop

    return uvloop.run(coro_fn())  # type: ignore[arg-type]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Event-sourced SCIM 2.0 service provider."""


@cli.command()
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
    from service.workers import ListenError, default_workers, serve_workers

    settings = _settings(data_dir, database_url, host=host, port=port)
    logsetup.configure()
    count = workers or default_workers()
    try:
        _run(lambda: _serve(settings) if count == 1 else serve_workers(settings, count))
    except ListenError as e:
        raise CliError(str(e)) from None


async def _serve(settings: Settings) -> None:
    """One process: the server, its pool and its projection runners."""
    from infra.supervisor import supervised
    from service.app import create_app
    from service.state import SUPERVISOR
    from service.workers import first_start, listen, print_banner

    async with (
        open_database(settings, serving=True) as database,
        supervised(database.embedded) as supervisor,
    ):
        issued = await first_start(database)
        app = create_app(settings, database)
        if supervisor is not None:
            app[SUPERVISOR] = supervisor
        # Handlers first: a SIGTERM that arrives once the banner is out must stop us cleanly.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runner = await listen(app, settings)
        print_banner(settings, issued)
        try:
            await stop.wait()
        finally:
            # Stops accepting, then waits for in-flight requests before the pool closes.
            await runner.cleanup()


@cli.command()
@database_options
def migrate(data_dir: Path | None, database_url: str | None) -> None:
    """Apply pending database migrations."""
    settings = _settings(data_dir, database_url)

    async def go() -> list[str]:
        async with open_database(settings, run_migrations=False) as db, db.pool.acquire() as conn:
            return await run_migrations(conn)

    applied = _run(go)
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))


@cli.command()
@click.option("--json", "json_output", is_flag=True, help="One JSON object per check.")
@database_options
def doctor(json_output: bool, data_dir: Path | None, database_url: str | None) -> None:
    """Check the database for failover safety (synchronous_commit, the standby, prepared
    transactions in doubt). Exit 1 if a check fails."""
    from infra.ha import failover_checks

    settings = _settings(data_dir, database_url)

    async def go() -> list[Any]:
        async with open_database(settings, run_migrations=False) as db, db.pool.acquire() as conn:
            return await failover_checks(conn)

    checks = _run(go)
    for check in checks:
        if json_output:
            print(orjson.dumps(check.as_dict()).decode())
        else:
            print(f"{'ok  ' if check.ok else 'WARN'}  {check.name}: {check.detail}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise CliError(f"not safe for a failover: {', '.join(failed)}")


@cli.group()
def projections() -> None:
    """Read models: status, rebuild from the event store, verify against a rebuild."""


def _selected(name: str | None, all_: bool) -> list[Any]:
    from projections.registry import PROJECTIONS

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
    from projections.rebuild import register, status
    from projections.registry import PROJECTIONS

    settings = _settings(data_dir, database_url)

    async def go() -> list[dict[str, Any]]:
        async with open_database(settings) as db:
            async with db.pool.acquire() as conn:
                await register(conn, list(PROJECTIONS.values()))
            return await status(db, list(PROJECTIONS.values()))

    rows = _run(go)
    if json_output:
        for row in rows:
            print(orjson.dumps(row).decode())
        return
    from rich.console import Console
    from rich.table import Table

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
    settings: Settings, selected: list[Any], dry_run: bool, quiet: bool, jobs: int | None = None
) -> list[Any]:
    """Rebuild the selected projections, each with its progress bar; several side by side in
    processes of their own (`jobs`, default one per core) when more than one is selected."""
    import os

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from projections import parallel
    from projections.rebuild import Rebuilder

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

    async def go() -> list[Any]:
        reports = []
        async with open_database(settings) as db:
            with bar:
                for projection in selected:
                    started[projection.name] = time.perf_counter()

                    def progress(done: int, total: int, name: str = projection.name) -> None:
                        tick(name, done, total)

                    rebuilder = Rebuilder(db, projection, progress=progress)
                    reports.append(await rebuilder.run(dry_run=dry_run))
        return reports

    return _run(go)


def _print_reports(reports: list[Any], *, swapped_word: str) -> None:
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
    reports = _rebuild(_settings(data_dir, database_url), selected, dry_run, quiet, jobs)
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
    reports = _rebuild(_settings(data_dir, database_url), selected, True, quiet, jobs)
    _print_reports(reports, swapped_word="swapped in")
    drift = [r.name for r in reports if r.drift]
    if drift:
        raise CliError(f"drift in {', '.join(drift)}")
    print("no drift")


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(raw: str) -> float:
    unit = raw[-1:].lower()
    try:
        return float(raw[:-1]) * _DURATION[unit] if unit in _DURATION else float(raw) * 86400
    except ValueError:
        raise click.BadParameter(f"{raw!r} is not a duration like 90d, 12h or 30m") from None


@cli.group()
def tokens() -> None:
    """Bearer tokens: several per tenant, so one can be rotated without downtime."""


@tokens.command("create")
@click.option("--tenant", required=True, help="Tenant name.")
@click.option(
    "--role",
    type=click.Choice(["provisioning", "audit"]),
    default="provisioning",
    show_default=True,
    help="provisioning: the SCIM API; audit: the provisioning log.",
)
@click.option("--name", default=None, help="A name to recognise the token by.")
@click.option("--expires", default=None, help="Lifetime, e.g. 90d, 12h, 30m.")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON line.")
@database_options
def tokens_create(
    tenant: str,
    role: str,
    name: str | None,
    expires: str | None,
    json_output: bool,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """Issue a token (the secret is shown once, and only its hash is stored)."""
    from datetime import UTC, datetime, timedelta

    from infra.tenants import issue_token

    settings = _settings(data_dir, database_url)
    expires_at = datetime.now(UTC) + timedelta(seconds=_duration(expires)) if expires else None

    issued = _on_connection(
        settings, lambda conn: issue_token(conn, tenant, role, name, expires_at)
    )
    if json_output:
        print(
            orjson.dumps(
                {
                    "id": str(issued.id),
                    "tenant": issued.tenant,
                    "token": issued.token,
                    "role": issued.role,
                }
            ).decode()
        )
    else:
        print(f"{issued.role} token {issued.id} for {issued.tenant} (shown once):\n{issued.token}")


@tokens.command("list")
@click.option("--tenant", required=True, help="Tenant name.")
@click.option("--json", "json_output", is_flag=True, help="Print JSON lines.")
@database_options
def tokens_list(
    tenant: str, json_output: bool, data_dir: Path | None, database_url: str | None
) -> None:
    """Names, roles, created, last used, expiry; never the secret."""
    from infra.tenants import list_tokens

    settings = _settings(data_dir, database_url)

    for row in _on_connection(settings, lambda conn: list_tokens(conn, tenant)):
        record = {
            k: (v.isoformat() if hasattr(v, "isoformat") else str(v) if v is not None else None)
            for k, v in dict(row).items()
        }
        print(
            orjson.dumps(record).decode()
            if json_output
            else "\t".join(
                str(record[k] or "-")
                for k in (
                    "id",
                    "name",
                    "role",
                    "created_at",
                    "last_used_at",
                    "expires_at",
                    "revoked_at",
                )
            )
        )


@tokens.command("revoke")
@click.argument("token_id")
@database_options
def tokens_revoke(token_id: str, data_dir: Path | None, database_url: str | None) -> None:
    """Revoke a token; it gets 401 from the next request on, on every instance."""
    import uuid as _uuid

    from infra.tenants import revoke_token

    try:
        key = _uuid.UUID(token_id)
    except ValueError:
        raise click.BadParameter(f"{token_id!r} is not a token id") from None
    settings = _settings(data_dir, database_url)

    if not _on_connection(settings, lambda conn: revoke_token(conn, key)):
        raise CliError(f"no live token {token_id}")
    print(f"revoked {token_id}")


def _audit_filters(fn: F) -> F:
    """The provisioning portal's filters, as options (audit list and audit export)."""
    for flag, key, metavar, help_text in reversed(_AUDIT_FILTERS):
        fn = click.option(flag, key, default=None, metavar=metavar, help=help_text)(fn)
    return fn


_AUDIT_FILTERS = (
    ("--from", "since", "ISO", "At or after this ISO 8601 date-time (with a zone, e.g. Z)."),
    ("--to", "until", "ISO", "Before this ISO 8601 date-time (with a zone, e.g. Z)."),
    ("--action", "action", "ACTION", "create, update, delete, disable or other."),
    ("--status", "status", "STATUS", "success, failure or skipped."),
    ("--target", "target", "ID", "Id of the user or group the entry is about."),
    ("--identity", "identity", "TEXT", "Target display name contains (case-insensitive)."),
    ("--change-id", "change_id", "ID", "The service's request id of the change."),
    (
        "--client-request-id",
        "client_request_id",
        "ID",
        "The client's own X-Request-Id of the change.",
    ),
    ("--error-code", "error_code", "CODE", "Entra error code, e.g. EntryConflict."),
)


def _audit_filter(
    since: str | None,
    until: str | None,
    action: str | None,
    status: str | None,
    target: str | None,
    identity: str | None,
    change_id: str | None,
    client_request_id: str | None,
    error_code: str | None,
) -> Any:
    from service.audit_queries import AuditFilter, BadQuery

    params = {
        "from": since,
        "to": until,
        "action": action,
        "status": status,
        "target": target,
        "identity": identity,
        "changeId": change_id,
        "clientRequestId": client_request_id,
        "errorCode": error_code,
    }
    try:
        return AuditFilter.parse({k: v for k, v in params.items() if v is not None})
    except BadQuery as e:
        raise click.UsageError(str(e)) from None


async def _tenant_id(conn: Any, tenant: str) -> Any:
    tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    if tenant_id is None:
        raise CliError(f"no tenant named {tenant!r}")
    return tenant_id


def _audit_console() -> Any:
    from rich.console import Console

    # Piped output keeps one row per entry instead of folding to 80 columns.
    return Console(width=None if sys.stdout.isatty() else 200)


def _audit_table(entries: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table("time", "id", "action", "status", "type", "target", "error", "change id")
    for e in entries:
        error = e["provisioningStatusInfo"]["errorInformation"] or {}
        target = e["targetIdentity"]
        table.add_row(
            e["activityDateTime"],
            e["id"],
            e["provisioningAction"],
            e["provisioningStatusInfo"]["status"],
            target["identityType"] or "-",
            target["displayName"] or target["id"] or "-",
            error.get("errorCode") or "-",
            e["changeId"] or "-",
        )
    return table


def _quiet_broken_pipe() -> None:
    """`scimledger audit … | head`: the reader left; stop without a traceback."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(1)


@cli.group()
def audit() -> None:
    """The provisioning log of a tenant, for scripts: list, show, history, export.

    The log is kept asynchronously from the event store, so it may trail the latest writes
    by a moment.
    """


def _page_options(order: str) -> Callable[[F], F]:
    """--limit, --next and --json of a paged audit command (`order`: which entry comes first)."""

    def wrap(command: F) -> F:
        command = click.option(
            "--json",
            "json_output",
            is_flag=True,
            help=f'One entry per line, {order} first; then {{"next": TOKEN}} as the last line'
            " only if there is a further page (pass it back with --next).",
        )(command)
        command = click.option(
            "--next", "next_token", default=None, help="Page token from a previous page."
        )(command)
        return click.option(
            "--limit",
            type=click.IntRange(1, 500),
            default=50,
            show_default=True,
            help="Entries per page (at most 500).",
        )(command)

    return wrap


@audit.command("list")
@click.option("--tenant", required=True, help="Tenant name.")
@_audit_filters
@_page_options("newest")
@database_options
def audit_list(
    tenant: str,
    since: str | None,
    until: str | None,
    action: str | None,
    status: str | None,
    target: str | None,
    identity: str | None,
    change_id: str | None,
    client_request_id: str | None,
    error_code: str | None,
    limit: int,
    next_token: str | None,
    json_output: bool,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """Entries newest first, a page at a time.

    Keyset pages: pass the token of one page with --next to get the following one.
    """
    from service import audit_queries as q

    where = _audit_filter(
        since, until, action, status, target, identity, change_id, client_request_id, error_code
    )
    if next_token is not None:
        try:
            q.decode_next(next_token)
        except q.BadQuery as e:
            raise click.UsageError(str(e)) from None
    settings = _settings(data_dir, database_url)

    async def go() -> tuple[list[dict[str, Any]], str | None]:
        async with open_database(settings) as db, db.pool.acquire() as conn:
            tenant_id = await _tenant_id(conn, tenant)
            try:
                return await q.page(conn, tenant_id, where, limit, next_token)
            except q.BadQuery as e:
                raise click.UsageError(str(e)) from None

    entries, more = _run(go)
    try:
        if json_output:
            lines = [orjson.dumps(e) for e in entries]
            if more:
                lines.append(orjson.dumps({"next": more}))
            sys.stdout.buffer.write(b"".join(line + b"\n" for line in lines))
            sys.stdout.flush()
            return
        console = _audit_console()
        console.print(_audit_table(entries))
        if more:
            console.print(f"next page: --next {more}", highlight=False, soft_wrap=True)
    except BrokenPipeError:
        _quiet_broken_pipe()


@audit.command("show")
@click.option("--tenant", required=True, help="Tenant name.")
@click.argument("entry_id")
@click.option("--json", "json_output", is_flag=True, help="Print the entry as one JSON line.")
@database_options
def audit_show(
    tenant: str,
    entry_id: str,
    json_output: bool,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """One entry: the request, its outcome, the attributes it changed."""
    from service import audit_queries as q

    settings = _settings(data_dir, database_url)

    async def work(conn: Any) -> dict[str, Any] | None:
        return await q.one(conn, await _tenant_id(conn, tenant), entry_id)

    entry = _on_connection(settings, work)
    if entry is None:
        raise CliError(f"no audit entry {entry_id} in tenant {tenant!r}")
    if json_output:
        print(orjson.dumps(entry).decode())
        return
    from rich.table import Table

    status = entry["provisioningStatusInfo"]
    error = status["errorInformation"] or {}
    target, request = entry["targetIdentity"], entry["request"]
    facts = Table.grid(padding=(0, 2))
    for label, value in (
        ("id", entry["id"]),
        ("time", entry["activityDateTime"]),
        ("action", entry["provisioningAction"]),
        ("status", status["status"]),
        ("error", f"{error['errorCode']}: {error['reason']}" if error else None),
        ("target", f"{target['identityType']} {target['id']} ({target['displayName']})"),
        ("source id", entry["sourceIdentity"]["id"]),
        ("initiated by", entry["initiatedBy"]["displayName"]),
        ("request", f"{request['method']} {request['path']} -> {request['status']}"),
        ("duration ms", entry["durationInMilliseconds"]),
        ("change id", entry["changeId"]),
        ("client request id", entry["clientRequestId"]),
        ("events", ", ".join(str(p) for p in entry["eventPositions"])),
    ):
        facts.add_row(label, "-" if value is None else str(value))
    console = _audit_console()
    console.print(facts)
    if entry["modifiedProperties"]:
        changes = Table("property", "old value", "new value")
        for p in entry["modifiedProperties"]:
            changes.add_row(p["displayName"], p["oldValue"] or "-", p["newValue"] or "-")
        console.print(changes)


@audit.command("history")
@click.option("--tenant", required=True, help="Tenant name.")
@click.argument("resource_id")
@_page_options("oldest")
@database_options
def audit_history(
    tenant: str,
    resource_id: str,
    limit: int,
    next_token: str | None,
    json_output: bool,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """The entries about one user or group, oldest first, a page at a time (as `list`)."""
    import uuid as _uuid

    from service import audit_queries as q

    try:
        key = _uuid.UUID(resource_id)
    except ValueError:
        raise click.BadParameter(f"{resource_id!r} is not a resource id") from None
    if next_token is not None:
        try:
            q.decode_next(next_token)
        except q.BadQuery as e:
            raise click.UsageError(str(e)) from None
    settings = _settings(data_dir, database_url)

    async def work(conn: Any) -> tuple[list[dict[str, Any]], str | None]:
        return await q.history(conn, await _tenant_id(conn, tenant), key, limit, next_token)

    entries, more = _on_connection(settings, work)
    try:
        if json_output:
            lines = [orjson.dumps(e) for e in entries]
            if more:
                lines.append(orjson.dumps({"next": more}))
            sys.stdout.buffer.write(b"".join(line + b"\n" for line in lines))
            sys.stdout.flush()
            return
        console = _audit_console()
        console.print(_audit_table(entries))
        if more:
            console.print(f"next page: --next {more}", highlight=False, soft_wrap=True)
    except BrokenPipeError:
        _quiet_broken_pipe()


@audit.command("export")
@click.option("--tenant", required=True, help="Tenant name.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    required=True,
    help="csv (a header row, then one row per entry) or jsonl (one entry per line).",
)
@_audit_filters
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to FILE (complete or not at all) instead of stdout.",
)
@database_options
def audit_export(
    tenant: str,
    fmt: str,
    since: str | None,
    until: str | None,
    action: str | None,
    status: str | None,
    target: str | None,
    identity: str | None,
    change_id: str | None,
    client_request_id: str | None,
    error_code: str | None,
    output: Path | None,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """Every selected entry, newest first, streamed in constant memory."""
    import os
    import tempfile

    from service import audit_queries as q
    from service.audit_export import ExportWriter

    where = _audit_filter(
        since, until, action, status, target, identity, change_id, client_request_id, error_code
    )
    settings = _settings(data_dir, database_url)

    async def go(sink: Any) -> int:
        out = ExportWriter(fmt)
        count = 0
        async with open_database(settings) as db, db.pool.acquire() as conn:
            tenant_id = await _tenant_id(conn, tenant)
            async with conn.transaction(readonly=True):
                async for entry in q.stream(conn, tenant_id, where):
                    out.add(entry)
                    count += 1
                    if out.full:
                        sink.write(out.take())
        sink.write(out.take())
        return count

    if output is None:
        try:
            _run(lambda: go(sys.stdout.buffer))
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_broken_pipe()
        return
    target_dir = output.resolve().parent
    if not target_dir.is_dir():
        raise CliError(f"cannot write {output}: no directory {target_dir}")
    fd, partial = tempfile.mkstemp(prefix=f".{output.name}.", dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as sink:
            count = _run(lambda: go(sink))
        os.replace(partial, output)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    print(f"exported {count} entries to {output}", file=sys.stderr)


@cli.group()
def tenants() -> None:
    """Tenants and their provisioning tokens."""


@tenants.command("create")
@click.argument("name")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON line.")
@database_options
def tenants_create(
    name: str, json_output: bool, data_dir: Path | None, database_url: str | None
) -> None:
    """Create a tenant and its first provisioning token (shown once)."""
    settings = _settings(data_dir, database_url)

    issued = _on_connection(settings, lambda conn: create_tenant(conn, name))
    if json_output:
        print(orjson.dumps({"tenant": issued.tenant, "token": issued.token}).decode())
    else:
        print(f"tenant {issued.tenant} created; provisioning token (shown once):\n{issued.token}")


@tenants.command("list")
@click.option("--json", "json_output", is_flag=True, help="Print JSON lines.")
@database_options
def tenants_list(json_output: bool, data_dir: Path | None, database_url: str | None) -> None:
    """List tenants."""
    settings = _settings(data_dir, database_url)

    for row in _on_connection(settings, list_tenants):
        record = {
            "tenant": row["name"],
            "id": str(row["id"]),
            "created": row["created_at"].isoformat(),
            "disabled": row["disabled_at"] is not None,
            "undeclared": row["undeclared"],
            "tokens": row["tokens"],
            # From the activity projection (asynchronous: may trail the latest writes).
            "users": row["users"],
            "groups": row["groups"],
            "events": row["events"],
            "last_change": row["last_event_at"].isoformat() if row["last_event_at"] else None,
        }
        if json_output:
            print(orjson.dumps(record).decode())
        else:
            flag = "\tdisabled" if record["disabled"] else ""
            print(
                f"{record['tenant']}\t{record['id']}\ttokens={record['tokens']}"
                f"\tusers={record['users']}\tgroups={record['groups']}{flag}"
            )


def _set_disabled(
    name: str, disabled: bool, data_dir: Path | None, database_url: str | None
) -> None:
    from infra.tenants import set_tenant_disabled

    settings = _settings(data_dir, database_url)
    changed = _on_connection(settings, lambda conn: set_tenant_disabled(conn, name, disabled))
    state = "disabled" if disabled else "enabled"
    print(f"tenant {name} {state}" if changed else f"tenant {name} was already {state}")


@tenants.command("disable")
@click.argument("name")
@database_options
def tenants_disable(name: str, data_dir: Path | None, database_url: str | None) -> None:
    """Refuse every token of a tenant (401) from the next request on; its data stays."""
    _set_disabled(name, True, data_dir, database_url)


@tenants.command("enable")
@click.argument("name")
@database_options
def tenants_enable(name: str, data_dir: Path | None, database_url: str | None) -> None:
    """Accept a disabled tenant's live tokens again."""
    _set_disabled(name, False, data_dir, database_url)


@tenants.command("set")
@click.argument("name")
@click.option(
    "--undeclared",
    type=click.Choice(["keep", "reject"]),
    required=True,
    help="Extension attributes no declared schema names: keep them as sent (the default), or"
    " answer 400 naming the URN and write nothing.",
)
@database_options
def tenants_set(
    name: str, undeclared: str, data_dir: Path | None, database_url: str | None
) -> None:
    """Change a tenant's settings (from the next request on)."""
    from infra.tenants import set_tenant_undeclared

    settings = _settings(data_dir, database_url)
    changed = _on_connection(settings, lambda conn: set_tenant_undeclared(conn, name, undeclared))
    done = "now" if changed else "already"
    print(f"tenant {name} {done} {undeclared}s undeclared extension attributes")


def _operator() -> str:
    import getpass

    try:
        return f"{getpass.getuser()} (scimledger CLI)"
    except (KeyError, OSError):
        return "scimledger CLI"


# Who declares: the provisioning log's initiatedBy for the entry the command records.
_by_option = click.option(
    "--by", default=_operator, show_default="the OS user", help="Who makes the change (logged)."
)


@cli.group()
def schemas() -> None:
    """Extension schemas a tenant declares (RFC 7643 §7 form), for Users or Groups."""


@schemas.command("add")
@click.option("--tenant", required=True, help="Tenant name.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--resource-type", type=click.Choice(["User", "Group"]), default="User", show_default=True
)
@_by_option
@database_options
def schemas_add(
    tenant: str,
    file: Path,
    resource_type: str,
    by: str,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """Declare an extension schema (a JSON file: id = the URN, name, attributes)."""
    from infra.schemas import BadDeclaration, declare, parse_declaration

    try:
        schema = parse_declaration(orjson.loads(file.read_bytes()))
    except orjson.JSONDecodeError as e:
        raise click.UsageError(f"{file} is not JSON: {e}") from None
    except BadDeclaration as e:
        raise click.UsageError(f"{file}: {e}") from None
    settings = _settings(data_dir, database_url)
    try:
        new = _on_database(
            settings, lambda db, conn: declare(conn, db.store, tenant, schema, resource_type, by)
        )
    except BadDeclaration as e:
        raise click.UsageError(str(e)) from None
    done = "declared" if new else "declared again"
    print(f"{schema['id']} {done} for {resource_type}s of tenant {tenant}")


@schemas.command("list")
@click.option("--tenant", required=True, help="Tenant name.")
@click.option("--json", "json_output", is_flag=True, help="Print JSON lines.")
@database_options
def schemas_list(
    tenant: str, json_output: bool, data_dir: Path | None, database_url: str | None
) -> None:
    """List a tenant's declared extension schemas."""
    from infra.schemas import declared

    settings = _settings(data_dir, database_url)
    for row in _on_connection(settings, lambda conn: declared(conn, tenant)):
        record = {
            "urn": row["urn"],
            "resourceType": row["resource_type"],
            "attributes": len(row["schema"]["attributes"]),
            "declared": row["declared_at"].isoformat(),
        }
        if json_output:
            print(orjson.dumps(record).decode())
        else:
            print(f"{record['urn']}\t{record['resourceType']}\tattributes={record['attributes']}")


@schemas.command("show")
@click.option("--tenant", required=True, help="Tenant name.")
@click.argument("urn")
@database_options
def schemas_show(tenant: str, urn: str, data_dir: Path | None, database_url: str | None) -> None:
    """Print one declared schema as JSON."""
    from infra.schemas import declared

    settings = _settings(data_dir, database_url)
    rows = _on_connection(settings, lambda conn: declared(conn, tenant))
    for row in rows:
        if row["urn"].casefold() == urn.casefold():
            print(orjson.dumps(row["schema"], option=orjson.OPT_INDENT_2).decode())
            return
    raise click.UsageError(f"tenant {tenant} declares no schema {urn}")


@schemas.command("remove")
@click.option("--tenant", required=True, help="Tenant name.")
@click.argument("urn")
@_by_option
@database_options
def schemas_remove(
    tenant: str, urn: str, by: str, data_dir: Path | None, database_url: str | None
) -> None:
    """Withdraw a declaration (values already recorded stay in the events)."""
    from infra.schemas import withdraw

    settings = _settings(data_dir, database_url)
    if not _on_database(settings, lambda db, conn: withdraw(conn, db.store, tenant, urn, by)):
        raise click.UsageError(f"tenant {tenant} declares no schema {urn}")
    print(f"{urn} removed from tenant {tenant}")


def _add_feeds() -> None:
    from service.feeds.cli import feeds  # it builds on the helpers above

    cli.add_command(feeds)


_add_feeds()


# Options naming a file or directory: any bytes the file system takes.
_PATH_OPTIONS = ("--data-dir", "--output")


def _unusable_argument(args: list[str]) -> str | None:
    """Any other argument may end up in a query (a tenant name, an audit filter): one the
    database cannot hold (not UTF-8, as Python hands over such argv bytes) is a usage error,
    not a traceback."""
    from service.boundary import text_problem

    previous = ""
    for position, arg in enumerate(args, start=1):
        path = previous in _PATH_OPTIONS or arg.startswith(tuple(f"{o}=" for o in _PATH_OPTIONS))
        previous = arg
        problem = None if path else text_problem(arg)
        if problem:
            return f"argument {position} {problem}"
    return None


def main(argv: list[str] | None = None) -> None:
    unusable = _unusable_argument(sys.argv[1:] if argv is None else argv)
    if unusable:
        print(f"scimledger: error: {unusable}", file=sys.stderr)
        sys.exit(2)
    try:
        cli.main(args=argv, prog_name="scimledger", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        print(e.format_message(), file=sys.stderr)
        sys.exit(2)
    except click.UsageError as e:
        print(f"scimledger: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except (CliError, DatabaseUnavailable) as e:
        print(f"scimledger: error: {e}", file=sys.stderr)
        sys.exit(1)
    except UnknownTenant as e:
        print(f"scimledger: error: no tenant named {e.args[0]!r}", file=sys.stderr)
        sys.exit(1)
    except TenantExists as e:
        print(f"scimledger: error: tenant {e.args[0]!r} already exists", file=sys.stderr)
        sys.exit(1)
    except click.ClickException as e:
        print(f"scimledger: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
