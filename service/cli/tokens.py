"""`scimledger tokens`: several bearer tokens per tenant, so one can be rotated without downtime."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import click
import orjson

from infra.tenants import issue_token, list_tokens, revoke_token
from service.cli.common import CliError, database_options, on_connection, settings_for

_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(raw: str) -> float:
    unit = raw[-1:].lower()
    try:
        return float(raw[:-1]) * _DURATION[unit] if unit in _DURATION else float(raw) * 86400
    except ValueError:
        raise click.BadParameter(f"{raw!r} is not a duration like 90d, 12h or 30m") from None


@click.group()
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
    settings = settings_for(data_dir, database_url)
    expires_at = datetime.now(UTC) + timedelta(seconds=_duration(expires)) if expires else None

    issued = on_connection(
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
    settings = settings_for(data_dir, database_url)

    for row in on_connection(settings, lambda conn: list_tokens(conn, tenant)):
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
    try:
        key = UUID(token_id)
    except ValueError:
        raise click.BadParameter(f"{token_id!r} is not a token id") from None
    settings = settings_for(data_dir, database_url)

    if not on_connection(settings, lambda conn: revoke_token(conn, key)):
        raise CliError(f"no live token {token_id}")
    print(f"revoked {token_id}")
