"""`scimledger erase …`, `scimledger keys rotate`, `scimledger audit erasures` (issue 17)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import click
import orjson

from infra.database import open_database
from service.cli.common import CliError, database_options, find_tenant, run, settings_for


def _uuid(raw: str, what: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise click.UsageError(f"{what} must be an id (a UUID), got {raw!r}") from None


def _print_receipt(receipt: Any, json_output: bool) -> None:
    body = receipt.as_json()
    if json_output:
        sys.stdout.buffer.write(orjson.dumps(body) + b"\n")
        sys.stdout.flush()
        return
    width = max(len(k) for k in body)
    for key, value in body.items():
        print(f"{key:<{width}}  {'' if value is None else value}")


@click.group("erase", invoke_without_command=True)
@click.option("--tenant", default=None, help="Tenant name.")
@click.option("--user", "user_id", default=None, help="Id of the user to erase.")
@click.option("--group", "group_id", default=None, help="Id of the group to erase.")
@click.option("--reason", default=None, help="Why (kept on the receipt; no personal data).")
@click.option("--requested-by", default="cli", show_default=True, help="Who asked.")
@click.option("--force", is_flag=True, help="Deprovision the subject first if it still exists.")
@click.option("--json", "json_output", is_flag=True, help="Print the receipt as one JSON line.")
@database_options
@click.pass_context
def erase(
    ctx: click.Context,
    tenant: str | None,
    user_id: str | None,
    group_id: str | None,
    reason: str | None,
    requested_by: str,
    force: bool,
    json_output: bool,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """Forget a person (or a group): destroy its data key, so its events can never be read
    again, and remove its values from every view. Prints the receipt.

    \b
    scimledger erase --tenant T --user ID [--reason TEXT] [--force]
    scimledger erase verify ERASURE_ID
    scimledger erase migrate
    """
    if ctx.invoked_subcommand is not None:
        return
    if tenant is None or (user_id is None) == (group_id is None):
        raise click.UsageError("erase needs --tenant and one of --user or --group")
    kind = "User" if user_id is not None else "Group"
    subject = _uuid(user_id or group_id or "", f"--{kind.lower()}")
    settings = settings_for(data_dir, database_url)

    async def go() -> Any:
        from service.erasure import ErasureError
        from service.erasure import erase as do_erase

        async with open_database(settings) as db:
            async with db.pool.acquire() as conn:
                tenant_id = await find_tenant(conn, tenant)
            try:
                return await do_erase(
                    db, tenant_id, subject, kind, requested_by, reason, force=force
                )
            except ErasureError as e:
                raise CliError(str(e)) from None

    _print_receipt(run(go), json_output)


@erase.command("verify")
@click.argument("erasure_id")
@click.option("--json", "json_output", is_flag=True, help="One JSON line.")
@database_options
def erase_verify(
    erasure_id: str, json_output: bool, data_dir: Path | None, database_url: str | None
) -> None:
    """Check an erasure's receipt: no event of the subject decrypts, no row holds its values.
    Exit code 0 when it holds, 1 otherwise."""
    wanted = _uuid(erasure_id, "ERASURE_ID")
    settings = settings_for(data_dir, database_url)

    async def go() -> Any:
        from service.erasure import verify

        async with open_database(settings) as db:
            return await verify(db, wanted)

    receipt, problems = run(go)
    if json_output:
        body = {"erasure": erasure_id, "verified": not problems, "problems": problems}
        if receipt is not None:
            body["receipt"] = receipt.as_json()
        sys.stdout.buffer.write(orjson.dumps(body) + b"\n")
        sys.stdout.flush()
    else:
        if receipt is not None:
            _print_receipt(receipt, False)
        for p in problems:
            print(f"FAIL  {p}")
        print(
            "verified: no event of the subject can be decrypted, no row holds its values"
            if not problems
            else "NOT verified"
        )
    if problems:
        sys.exit(1)


@erase.command("migrate")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@database_options
def erase_migrate(quiet: bool, data_dir: Path | None, database_url: str | None) -> None:
    """Encrypt, in place, the events stored before encryption (once, after upgrading).
    Positions are kept; run it again to resume an interrupted run."""
    settings = settings_for(data_dir, database_url)

    async def go() -> int:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from service.erasure import migrate_all

        async with open_database(settings) as db:
            if quiet:
                return await migrate_all(db)
            with Progress(
                TextColumn("sealing streams"),
                BarColumn(),
                MofNCompleteColumn(),
                transient=True,
            ) as bar:
                task = bar.add_task("seal", total=None)

                def progress(done: int, total: int) -> None:
                    bar.update(task, completed=done, total=total)

                return await migrate_all(db, progress)

    sealed = run(go)
    print(f"{sealed} event(s) encrypted in place")


@click.group("keys")
def keys() -> None:
    """The encryption keys of personal data (see `scimledger erase`)."""


@keys.command("rotate")
@click.option("--tenant", default=None, help="Only this tenant (default: every tenant).")
@click.option(
    "--new-master-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also rewrap under this new master key (base64, 32 bytes; `keys new-master` makes"
    " one); configure it before the next start.",
)
@database_options
def keys_rotate(
    tenant: str | None,
    new_master_key_file: Path | None,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """New key-encryption keys; every data key rewrapped. No event is re-encrypted."""
    from infra.keys import _decode_key

    new_master = None
    if new_master_key_file is not None:
        try:
            new_master = _decode_key(new_master_key_file.read_text(), str(new_master_key_file))
        except (OSError, ValueError) as e:
            raise CliError(str(e)) from None
    settings = settings_for(data_dir, database_url)

    async def go() -> list[tuple[str, int]]:
        async with open_database(settings) as db, db.pool.acquire() as conn:
            if tenant is not None:
                tenants = [(tenant, await find_tenant(conn, tenant))]
            else:
                rows = await conn.fetch("SELECT name, id FROM tenants ORDER BY name")
                tenants = [(r["name"], r["id"]) for r in rows]
            done = []
            for name, tenant_id in tenants:
                async with conn.transaction():
                    done.append((name, await db.store.keys.rotate(conn, tenant_id, new_master)))
            return done

    for name, count in run(go):
        print(f"tenant {name}: {count} data key(s) rewrapped")


@keys.command("new-master")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keys_new_master(path: Path) -> None:
    """Write a new random master key to PATH (for `keys rotate --new-master-key-file`)."""
    import os

    from infra.keys import new_master_key_text

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(new_master_key_text() + "\n")
    print(f"new master key written to {path}")


@click.command("erasures")
@click.option("--tenant", required=True, help="Tenant name.")
@click.option("--json", "json_output", is_flag=True, help="One receipt per line.")
@database_options
def audit_erasures(
    tenant: str, json_output: bool, data_dir: Path | None, database_url: str | None
) -> None:
    """The tenant's erasures, newest first, with their receipts."""
    settings = settings_for(data_dir, database_url)

    async def go() -> list[Any]:
        from service.erasure import receipts

        async with open_database(settings) as db, db.pool.acquire() as conn:
            return await receipts(conn, await find_tenant(conn, tenant))

    found = run(go)
    if json_output:
        sys.stdout.buffer.write(b"".join(orjson.dumps(r.as_json()) + b"\n" for r in found))
        sys.stdout.flush()
        return
    for r in found:
        print(
            f"{r.id}  {r.erased_at.isoformat()}  {r.subject_type} {r.subject_id}"
            f"  by {r.requested_by}  events {r.events}  reason: {r.reason or '-'}"
        )


# `erase` and `keys` are command groups of their own; `audit erasures` joins the audit group.
COMMANDS: list[click.Command] = [erase, keys]
