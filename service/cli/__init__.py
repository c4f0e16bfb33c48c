"""The `scimledger` command: one module per command group, registered below.

Every command takes --data-dir / SCIMLEDGER_DATA_DIR and --database-url / DATABASE_URL and so
reaches the same database as a `serve` running on that data directory (service.cli.common).
"""

from __future__ import annotations

import sys

import click

from infra.database import DatabaseUnavailable
from infra.tenants import TenantExists, UnknownTenant
from service.boundary import text_problem
from service.cli import audit, erasure, projections, schemas, server, tenants, tokens
from service.cli.common import CliError
from service.feeds.cli import feeds


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Event-sourced SCIM 2.0 service provider."""


COMMANDS: list[click.Command] = [
    *server.COMMANDS,
    projections.projections,
    tokens.tokens,
    audit.audit,
    tenants.tenants,
    schemas.schemas,
    feeds,
    *erasure.COMMANDS,
]
for command in COMMANDS:
    cli.add_command(command)
audit.audit.add_command(erasure.audit_erasures)


# Options naming a file or directory: any bytes the file system takes.
_PATH_OPTIONS = ("--data-dir", "--output")


def _unusable_argument(args: list[str]) -> str | None:
    """Any other argument may end up in a query (a tenant name, an audit filter): one the
    database cannot hold (not UTF-8, as Python hands over such argv bytes) is a usage error,
    not a traceback."""
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
