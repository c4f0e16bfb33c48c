"""What every command group shares: the database options, the settings they make, and the one
helper that opens the database for a command and runs its work there."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import click
import uvloop

from infra.config import Settings
from infra.database import Database, open_database
from infra.eventstore import Conn

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


def settings_for(data_dir: Path | None, database_url: str | None, **kw: Any) -> Settings:
    """The settings of a command: the defaults, its --data-dir / --database-url and `kw`."""
    changes: dict[str, Any] = {k: v for k, v in kw.items() if v is not None}
    if data_dir is not None:
        changes["data_dir"] = data_dir
    if database_url:
        changes["database_url"] = database_url
    return replace(Settings(), **changes)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    return uvloop.run(coro_fn())  # type: ignore[arg-type]


def on_database(
    settings: Settings,
    work: Callable[[Database], Awaitable[T]],
    *,
    run_migrations: bool = True,
) -> T:
    """Open the database these settings name (migrated, unless told not to), run `work(db)`
    on it and close it again."""

    async def go() -> T:
        async with open_database(settings, run_migrations=run_migrations) as db:
            return await work(db)

    return run(go)


def on_connection(
    settings: Settings,
    work: Callable[[Any], Awaitable[T]],
    *,
    run_migrations: bool = True,
) -> T:
    """`on_database`, with `work(conn)` on one pooled connection."""

    async def go(db: Database) -> T:
        async with db.pool.acquire() as conn:
            return await work(conn)

    return on_database(settings, go, run_migrations=run_migrations)


async def find_tenant(conn: Conn, tenant: str) -> UUID:
    """The id of the tenant named `tenant`, or a CliError."""
    tenant_id: UUID | None = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    if tenant_id is None:
        raise CliError(f"no tenant named {tenant!r}")
    return tenant_id
