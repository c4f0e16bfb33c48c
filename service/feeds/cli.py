"""`scimledger feeds`: an operator's event streams (service/feeds/streams.py)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from service.cli.common import database_options, on_connection, settings_for
from service.feeds import streams
from service.feeds.targets import TargetRefused

T = TypeVar("T")


def _do(data_dir: Path | None, database_url: str | None, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(conn)`; an operator's mistake (unknown stream, bad URL) is a usage error."""
    settings = settings_for(data_dir, database_url)
    try:
        return on_connection(settings, work)
    except (streams.StreamError, TargetRefused) as e:
        raise click.UsageError(str(e)) from None


@click.group()
def feeds() -> None:
    """SCIM event streams (RFC 9967 SETs by poll, RFC 8936, or push, RFC 8935)."""


@feeds.command("create")
@click.option("--tenant", required=True, help="Tenant name.")
@click.option("--name", required=True, help="The stream's name (one per consumer).")
@click.option("--poll", "poll_", is_flag=True, help="Poll delivery: POST /events/{id}.")
@click.option("--push", "push_url", default=None, help="Push delivery to this https URL.")
@click.option("--events", default=None, help="Comma list, e.g. prov:create,prov:delete.")
@click.option("--full", is_flag=True, help="Full form (data) instead of notice (attributes).")
@click.option("--scope-group", default=None, help="Only the members of this group (id).")
@click.option("--from-start", is_flag=True, help="Replay the log from its beginning.")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON line.")
@database_options
def feeds_create(
    tenant: str,
    name: str,
    poll_: bool,
    push_url: str | None,
    events: str | None,
    full: bool,
    scope_group: str | None,
    from_start: bool,
    json_output: bool,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """Create a stream; a poll stream's token is shown once."""
    if poll_ == (push_url is not None):
        raise click.UsageError("give exactly one of --poll and --push URL")
    try:
        names = streams.parse_events(events)
        group = uuid.UUID(scope_group) if scope_group else None
    except streams.StreamError as e:
        raise click.UsageError(str(e)) from None
    except ValueError:
        raise click.UsageError("--scope-group must be a group id") from None
    created = _do(
        data_dir,
        database_url,
        lambda conn: streams.create(
            conn,
            tenant=tenant,
            name=name,
            endpoint=push_url,
            events=names,
            full=full,
            scope_group=group,
            from_start=from_start,
        ),
    )
    if json_output:
        print(orjson.dumps(created).decode())
        return
    print(f"stream {created['name']} ({created['id']}) created for {tenant}")
    if "token" in created:
        print(f"poll URL: /events/{created['id']}; feed token (shown once):\n{created['token']}")


@feeds.command("list")
@click.option("--tenant", required=True, help="Tenant name.")
@click.option("--json", "json_output", is_flag=True, help="Print JSON lines.")
@database_options
def feeds_list(
    tenant: str, json_output: bool, data_dir: Path | None, database_url: str | None
) -> None:
    """The tenant's streams: delivery, state, SETs produced, delivered, pending."""
    for row in _do(data_dir, database_url, lambda conn: streams.list_streams(conn, tenant)):
        record = streams.describe(row)
        if json_output:
            print(orjson.dumps(record).decode())
        else:
            print(
                f"{record['name']}\t{record['id']}\t{record['delivery']}\t{record['state']}"
                f"\tproduced={record['produced']}\tdelivered={record['delivered']}"
                f"\tpending={record['pending']}"
            )


@feeds.command("show")
@click.argument("name")
@click.option("--tenant", required=True, help="Tenant name.")
@database_options
def feeds_show(name: str, tenant: str, data_dir: Path | None, database_url: str | None) -> None:
    """One stream as JSON, with `behind`: the tenant's events past its checkpoint."""
    record = _do(data_dir, database_url, lambda conn: streams.show(conn, tenant, name))
    print(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode())


def _simple(action: str, help_text: str) -> None:
    @feeds.command(action, help=help_text)
    @click.argument("name")
    @click.option("--tenant", required=True, help="Tenant name.")
    @database_options
    def command(name: str, tenant: str, data_dir: Path | None, database_url: str | None) -> None:
        async def work(conn: Any) -> None:
            if action == "delete":
                await streams.delete(conn, tenant, name)
            else:
                await streams.set_paused(conn, tenant, name, action == "pause")

        _do(data_dir, database_url, work)
        print(f"stream {name} {action}d" if action != "pause" else f"stream {name} paused")


_simple("pause", "Stop producing and delivering (the checkpoint stays).")
_simple("resume", "Produce and deliver again from the checkpoint.")
_simple("delete", "Delete the stream, its pending SETs, and revoke its token.")


@feeds.command("reset")
@click.argument("name")
@click.option("--tenant", required=True, help="Tenant name.")
@click.option("--from", "start", required=True, help="START, NOW or an ISO 8601 timestamp.")
@database_options
def feeds_reset(
    name: str, tenant: str, start: str, data_dir: Path | None, database_url: str | None
) -> None:
    """Move the stream's checkpoint; pending SETs are dropped and produced again from there."""
    _do(data_dir, database_url, lambda conn: streams.reset(conn, tenant, name, start))
    print(f"stream {name} reset to {start}")


@feeds.command("rotate-key")
@click.option("--tenant", required=True, help="Tenant name.")
@database_options
def feeds_rotate_key(tenant: str, data_dir: Path | None, database_url: str | None) -> None:
    """New signing key for the tenant's SETs; the old one stays in the JWKS while SETs it
    signed wait for delivery."""
    from service.feeds.keys import rotate

    async def work(conn: Any) -> str:
        tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
        if tenant_id is None:
            raise streams.StreamError(f"no tenant named {tenant!r}")
        return await rotate(conn, tenant_id)

    print(f"new signing key {_do(data_dir, database_url, work)} for {tenant}")
