"""The whole benchmark in one table (bench/results/latest.md, quick.md with --quick, a run of
some rows latest-<rows>.md): one function per row in ROWS, on a durable embedded PostgreSQL,
with `scimledger serve` and scim2-server (in memory) as the peer for the rows over HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import click
import psutil
import uvloop
from rich.console import Console
from rich.markdown import Markdown

from bench import wrk
from bench.audit import audit
from bench.common import (
    PROGRESS,
    ROOT,
    BenchError,
    Meter,
    create_tenant,
    durable_postgres,
    err,
    free_port,
    machine_description,
    postgres_facts,
    revision,
    scimledger,
    serving,
)
from bench.cost import cost
from bench.extensions import extensions
from bench.feeds import feeds
from bench.groups import cycle, groups
from bench.lookups import lookups
from bench.posts import post_users
from bench.rebuild import rebuild
from bench.table import CONCURRENCY, FULL, QUICK, Ctx, Server, render_markdown

PEER = ROOT / ".venv" / "bin" / "scim2-server"
DIR = click.Path(file_okay=False, path_type=Path)
CHECKOUT = click.Path(exists=True, file_okay=False, path_type=Path)

# The table's rows in the order they run: (name, function, over HTTP with the servers up).
# A new row is one function taking the run's Ctx and one line here.
ROWS: list[tuple[str, Callable[[Ctx], Awaitable[None]], bool]] = [
    ("post", post_users, True), ("lookups", lookups, True), ("groups", groups, True),
    ("cycle", cycle, True), ("rebuild", rebuild, False), ("audit", audit, False),
    ("cost", cost, False), ("feeds", feeds, False), ("extensions", extensions, False),
]  # fmt: skip
PARTS = ("peer", *(name for name, _, _ in ROWS))


async def over_http(ctx: Ctx, rows: list[Callable[[Ctx], Awaitable[None]]]) -> None:
    """The rows that talk to `scimledger serve` (and the peer), with both up meanwhile."""
    peer_port, peer_token, token = free_port(), uuid.uuid4().hex, create_tenant(ctx.dsn)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY, limit_per_host=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=600)
    async with contextlib.AsyncExitStack() as servers:
        if "peer" in ctx.skip:
            ctx.notes.append("(8) the peer was skipped (--skip peer)")
        elif not PEER.exists():
            ctx.notes.append(f"(8) the peer is not installed ({PEER}): `make bench` installs it")
        else:
            origin = f"http://127.0.0.1:{peer_port}"
            argv = [str(PEER), "--port", str(peer_port), "--bearer-token", peer_token]
            ready, auth = f"{origin}/v2/ServiceProviderConfig", f"Bearer {peer_token}"
            started = serving(argv, ready, headers={"Authorization": auth}, stop_timeout=10)
            peer = await servers.enter_async_context(started)
            meter = Meter(psutil.Process(peer.pid), None)
            ctx.peer = Server(origin, f"{origin}/v2", peer_token, peer, meter)
        origin, proc = await servers.enter_async_context(scimledger(ctx.dsn))
        meter = Meter(psutil.Process(proc.pid), ctx.postmaster)
        ctx.ours = Server(origin, f"{origin}/scim/v2", token, proc, meter, ctx.profile)
        ctx.session = await servers.enter_async_context(
            aiohttp.ClientSession(connector=connector, timeout=timeout)
        )
        try:
            for row in rows:
                with shown():
                    await row(ctx)
        finally:
            ctx.session = ctx.ours = ctx.peer = None


async def run_rows(ctx: Ctx) -> None:
    ctx.postmaster, ctx.pg_version = await postgres_facts(ctx.dsn)
    served = [f for name, f, http in ROWS if http and name not in ctx.skip]
    if served:
        await over_http(ctx, served)
    for name, row, http in ROWS:
        if not http and name not in ctx.skip:
            with shown():
                await row(ctx)


@contextlib.contextmanager
def shown() -> Iterator[None]:
    """A row's progress on screen while it runs (its bars left above), cleared for the next."""
    with PROGRESS:
        yield
    for task in PROGRESS.task_ids:
        PROGRESS.remove_task(task)


def report(ctx: Ctx, load_before: tuple[float, ...], rev: str, started: float) -> None:
    """The table, the machine and the notes: into bench/results/, and shown."""
    ctx.rows.sort(key=lambda r: int(r.item))
    machine = machine_description(ctx.pg_version, load_before, rev)
    ctx.notes.append(f"the whole run took {time.perf_counter() - started:,.0f} s")
    name = "quick" if ctx.quick else "latest"
    only = [n for n in PARTS[1:] if n not in ctx.skip]
    if len(only) < len(PARTS) - 1:
        name += "-" + "-".join(only)
    name += "-set" if any(n.startswith("sizes set") for n in ctx.notes) else ""
    target = ROOT / "bench" / "results" / f"{name}.md"
    title = "scimledger benchmark" + (" (quick sizes)" if ctx.quick else "")
    stamp = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `make bench{'-quick' * ctx.quick}`"
    text = render_markdown(f"{title}, {stamp}", ctx.rows, ctx.notes, machine)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    Console(width=None if sys.stdout.isatty() else 220).print(Markdown(text))
    err.print(f"written to {target.relative_to(ROOT)}")


def parts(value: str) -> frozenset[str]:
    chosen = frozenset(part for part in value.split(",") if part)
    if not chosen <= set(PARTS):
        raise click.BadParameter(f"takes {', '.join(PARTS)}")
    return chosen


@click.command(help=(__doc__ or "").splitlines()[0])
@click.option("--quick", is_flag=True, help="Smaller sizes: a few minutes.")
@click.option("--skip", default="", help=f"Rows to leave out, comma-separated: {', '.join(PARTS)}.")
@click.option("--only", default="", help="The rows to run (and the peer), comma-separated.")
@click.option("--profile", type=DIR, help="py-spy profiles of the server's wrk runs, into DIR.")
@click.option("--code", type=CHECKOUT, help="Run the servers from this checkout (PYTHONPATH).")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="NAME=VALUE",
    help="A size of bench/table.py's Sizes, e.g. rebuild_events=50000, users=1000,2000,3000.",
)
def main(
    quick: bool, skip: str, only: str, profile: Path | None, code: Path | None, sets: list[str]
) -> None:  # fmt: skip
    left_out = parts(skip) | (frozenset(PARTS[1:]) - parts(only) if only else frozenset())
    try:
        sizes = (QUICK if quick else FULL).with_set(sets)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--set") from e
    if code is not None:
        os.environ["PYTHONPATH"] = str(code.resolve())
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    load_before, started, rev = os.getloadavg(), time.perf_counter(), revision()
    try:
        wrk.executable()  # fails early with the install hint
        with contextlib.ExitStack() as stack:
            # Runs last: Ctrl-C back; a second Ctrl-C must not interrupt stopping the servers.
            stack.callback(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT))
            err.print("starting a durable embedded PostgreSQL …")
            dsn = stack.enter_context(durable_postgres())
            stack.callback(signal.signal, signal.SIGINT, signal.SIG_IGN)
            ctx = Ctx(sizes, quick, dsn, skip=left_out, profile=profile)
            if left_out:
                ctx.notes.append(f"parts left out of this run: {', '.join(sorted(left_out))}")
            if sets:
                ctx.notes.append(f"sizes set (--set): {', '.join(sets)}")
            uvloop.run(run_rows(ctx))
    except wrk.WrkMissing as e:
        err.print(f"[red]{e}[/red]", markup=True, highlight=False)
        sys.exit(2)
    except BenchError as e:
        err.print(f"[red]benchmark failed:[/red] {e}", markup=True, highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; servers and PostgreSQL stopped")
        sys.exit(130)
    report(ctx, load_before, rev, started)


if __name__ == "__main__":
    main()
