"""`scimledger tenants`: tenants, their first token and their settings."""

from __future__ import annotations

from pathlib import Path

import click
import orjson

from infra.tenants import create_tenant, list_tenants, set_tenant_disabled, set_tenant_undeclared
from service.cli.common import database_options, on_connection, settings_for


@click.group()
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
    settings = settings_for(data_dir, database_url)

    issued = on_connection(settings, lambda conn: create_tenant(conn, name))
    if json_output:
        print(orjson.dumps({"tenant": issued.tenant, "token": issued.token}).decode())
    else:
        print(f"tenant {issued.tenant} created; provisioning token (shown once):\n{issued.token}")


@tenants.command("list")
@click.option("--json", "json_output", is_flag=True, help="Print JSON lines.")
@database_options
def tenants_list(json_output: bool, data_dir: Path | None, database_url: str | None) -> None:
    """List tenants."""
    settings = settings_for(data_dir, database_url)

    for row in on_connection(settings, list_tenants):
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
    settings = settings_for(data_dir, database_url)
    changed = on_connection(settings, lambda conn: set_tenant_disabled(conn, name, disabled))
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
    settings = settings_for(data_dir, database_url)
    changed = on_connection(settings, lambda conn: set_tenant_undeclared(conn, name, undeclared))
    done = "now" if changed else "already"
    print(f"tenant {name} {done} {undeclared}s undeclared extension attributes")
