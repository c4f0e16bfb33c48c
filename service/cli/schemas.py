"""`scimledger schemas`: the extension schemas a tenant declares."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

import click
import orjson

from infra.database import Database
from infra.schemas import BadDeclaration, declare, declared, parse_declaration, withdraw
from service.cli.common import database_options, on_connection, on_database, settings_for


def _operator() -> str:
    try:
        return f"{getpass.getuser()} (scimledger CLI)"
    except (KeyError, OSError):
        return "scimledger CLI"


# Who declares: the provisioning log's initiatedBy for the entry the command records.
_by_option = click.option(
    "--by", default=_operator, show_default="the OS user", help="Who makes the change (logged)."
)


async def _in(db: Database, work: Any) -> Any:
    """`work(db, conn)` on one pooled connection: for commands that append events."""
    async with db.pool.acquire() as conn:
        return await work(db, conn)


@click.group()
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
    try:
        schema = parse_declaration(orjson.loads(file.read_bytes()))
    except orjson.JSONDecodeError as e:
        raise click.UsageError(f"{file} is not JSON: {e}") from None
    except BadDeclaration as e:
        raise click.UsageError(f"{file}: {e}") from None
    settings = settings_for(data_dir, database_url)
    try:
        new = on_database(
            settings,
            lambda db: _in(
                db, lambda db, conn: declare(conn, db.store, tenant, schema, resource_type, by)
            ),
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
    settings = settings_for(data_dir, database_url)
    for row in on_connection(settings, lambda conn: declared(conn, tenant)):
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
    settings = settings_for(data_dir, database_url)
    rows = on_connection(settings, lambda conn: declared(conn, tenant))
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
    settings = settings_for(data_dir, database_url)
    if not on_database(
        settings, lambda db: _in(db, lambda db, conn: withdraw(conn, db.store, tenant, urn, by))
    ):
        raise click.UsageError(f"tenant {tenant} declares no schema {urn}")
    print(f"{urn} removed from tenant {tenant}")
