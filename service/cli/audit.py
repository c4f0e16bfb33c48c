"""`scimledger audit`: a tenant's provisioning log for scripts: list, show, history, export."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO
from uuid import UUID

import click
import orjson
from rich.console import Console
from rich.table import Table

from infra.eventstore import Conn
from service import audit_queries as q
from service.audit_export import ExportWriter, whole_export
from service.cli.common import (
    CliError,
    F,
    database_options,
    find_tenant,
    on_connection,
    settings_for,
)


def _audit_filters(fn: F) -> F:
    """The provisioning portal's filters, as options (audit list and audit export): the
    command takes them as keyword arguments for `_audit_filter`."""
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
) -> q.AuditFilter:
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
        return q.AuditFilter.parse({k: v for k, v in params.items() if v is not None})
    except q.BadQuery as e:
        raise click.UsageError(str(e)) from None


def _audit_console() -> Console:
    # Piped output keeps one row per entry instead of folding to 80 columns.
    return Console(width=None if sys.stdout.isatty() else 200)


def _audit_table(entries: list[dict[str, Any]]) -> Table:
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
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(1)


@click.group()
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
    limit: int,
    next_token: str | None,
    json_output: bool,
    data_dir: Path | None,
    database_url: str | None,
    **filters: str | None,
) -> None:
    """Entries newest first, a page at a time.

    Keyset pages: pass the token of one page with --next to get the following one.
    """
    where = _audit_filter(**filters)
    _check_next(next_token)
    settings = settings_for(data_dir, database_url)

    async def work(conn: Conn) -> tuple[list[dict[str, Any]], str | None]:
        try:
            return await q.page(conn, await find_tenant(conn, tenant), where, limit, next_token)
        except q.BadQuery as e:
            raise click.UsageError(str(e)) from None

    _print_page(*on_connection(settings, work), json_output)


def _check_next(next_token: str | None) -> None:
    """A page token that is not one is a usage error before the database is opened."""
    if next_token is not None:
        try:
            q.decode_next(next_token)
        except q.BadQuery as e:
            raise click.UsageError(str(e)) from None


def _print_page(entries: list[dict[str, Any]], more: str | None, json_output: bool) -> None:
    """A page of entries, and how to ask for the next one if there is one."""
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
    settings = settings_for(data_dir, database_url)

    async def work(conn: Conn) -> dict[str, Any] | None:
        return await q.one(conn, await find_tenant(conn, tenant), entry_id)

    entry = on_connection(settings, work)
    if entry is None:
        raise CliError(f"no audit entry {entry_id} in tenant {tenant!r}")
    if json_output:
        print(orjson.dumps(entry).decode())
        return
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
        ("events", "; ".join(_event_text(e) for e in entry["events"])),
    ):
        facts.add_row(label, "-" if value is None else str(value))
    console = _audit_console()
    console.print(facts)
    if entry["modifiedProperties"]:
        changes = Table("property", "old value", "new value")
        for p in entry["modifiedProperties"]:
            changes.add_row(p["displayName"], p["oldValue"] or "-", p["newValue"] or "-")
        console.print(changes)


def _event_text(event: dict[str, Any]) -> str:
    """An event by what is the tenant's own: type, resource (or stream) and version."""
    return f"{event['type']} {event['resource'] or event['stream']} v{event['version']}"


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
    try:
        key = UUID(resource_id)
    except ValueError:
        raise click.BadParameter(f"{resource_id!r} is not a resource id") from None
    _check_next(next_token)
    settings = settings_for(data_dir, database_url)

    async def work(conn: Conn) -> tuple[list[dict[str, Any]], str | None]:
        return await q.history(conn, await find_tenant(conn, tenant), key, limit, next_token)

    _print_page(*on_connection(settings, work), json_output)


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
    output: Path | None,
    data_dir: Path | None,
    database_url: str | None,
    **filters: str | None,
) -> None:
    """Every selected entry, newest first, streamed in constant memory: the export's pages
    (as the API returns them) one after the other, in one file."""
    where = _audit_filter(**filters)
    settings = settings_for(data_dir, database_url)

    def export_to(sink: BinaryIO) -> int:
        async def work(conn: Conn) -> int:
            tenant_id = await find_tenant(conn, tenant)
            out = ExportWriter(fmt)
            limits = settings.max_export_entries, settings.max_export_bytes
            async with conn.transaction(readonly=True):
                async for data in whole_export(conn, tenant_id, where, out, *limits):
                    sink.write(data)
            return out.entries

        return on_connection(settings, work)

    if output is None:
        try:
            export_to(sys.stdout.buffer)
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
            count = export_to(sink)
        os.replace(partial, output)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    print(f"exported {count} entries to {output}", file=sys.stderr)
