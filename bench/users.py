"""SCIM Users the way Entra uses them, against a real `scimledger serve` process.

    .venv/bin/python -m bench.users [--users N] [--posts N] [--gets N] [--concurrency C]

- `GET /scim/v2/Users?filter=userName eq "…"` for random existing userNames in random case;
- `POST /scim/v2/Users` with Entra's body (ENTRA.md) and unique userNames;

both at concurrency 16, first with `--mid` (10,000) stored users, then again once the store has
grown to `--users` (100,000), so the table shows how the cost grows with the store. Each measured
phase is a fixed number of requests after a short warm-up.

The server runs as a subprocess on a durable embedded PostgreSQL (fsync and synchronous_commit
on). Every stored user goes through the real write path: the store is seeded through the HTTP
API, never behind the service's back. The load client is one aiohttp session in this process
with a pool of `--concurrency` connections and pre-built requests; the table shows the CPU time
the client, the server and PostgreSQL spent in each measured phase so readers can see who was
busy. The table is also written as markdown to bench/results/users-latest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import asyncpg
import orjson
import psutil
import yarl
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bench.common import (
    ROOT,
    SCIMLEDGER,
    durable_postgres,
    machine,
    machine_busy,
    percentile,
    revision,
)

RESULTS = ROOT / "bench" / "results" / "users-latest.md"
SCIM = "application/scim+json"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
COLUMNS = (
    "phase",
    "stored users",
    "requests",
    "req/s",
    "p50 ms",
    "p99 ms",
    "server CPU s",
    "client CPU s",
    "postgres CPU s",
)

err = Console(stderr=True)


class BenchError(Exception):
    """The server answered something a correct server would not; reported, not worked around."""


# --- what Entra sends --------------------------------------------------------------------------


def user_name(i: int) -> str:
    return f"Bench_User_{i:06d}@Contoso.com"


def entra_body(i: int) -> bytes:
    """ENTRA.md's POST /Users body, with a unique userName, work e-mail and externalId."""
    name = user_name(i)
    return orjson.dumps(
        {
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE],
            "externalId": str(uuid.uuid4()),
            "userName": name,
            "active": True,
            "addresses": None,
            "manager": None,
            "emails": [{"primary": True, "type": "work", "value": name}],
            "meta": {"resourceType": "User"},
            "name": {
                "formatted": "givenName familyName",
                "familyName": "familyName",
                "givenName": "givenName",
            },
            "roles": [],
        }
    )


def case_varied(name: str, rng: random.Random) -> str:
    """userName is caseExact=false: Entra's lookup need not match the stored case."""
    match rng.randrange(4):
        case 0:
            return name.lower()
        case 1:
            return name.upper()
        case 2:
            return name.swapcase()
        case _:
            return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in name)


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def create_tenant(dsn: str) -> str:
    """`scimledger tenants create bench --json`; the token it prints."""
    name = "bench"
    for _ in range(2):
        done = subprocess.run(
            [str(SCIMLEDGER), "tenants", "create", name, "--json", "--database-url", dsn],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode == 0:
            token: str = json.loads(done.stdout.strip().splitlines()[-1])["token"]
            return token
        if "already exists" in done.stderr:  # an external DATABASE_URL used before
            name = f"bench-{uuid.uuid4().hex[:8]}"
            continue
        break
    raise BenchError(f"scimledger tenants create failed ({done.returncode}): {done.stderr.strip()}")


def _die_with_parent() -> None:
    """In the child: SIGTERM if this benchmark dies without cleaning up (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def child_process(
    argv: list[str], log: Path, *, env: dict[str, str] | None = None, stop_timeout: float = 30
) -> Iterator[subprocess.Popen[bytes]]:
    """A server of the benchmark's, in its own session (Ctrl-C reaches only us), its output in
    `log`; SIGTERM on the way out, SIGKILL if it ignores that for `stop_timeout` seconds."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=stop_timeout)
                except subprocess.TimeoutExpired:
                    err.print(f"[yellow]{Path(argv[0]).name} ignored SIGTERM; killing it")
                    proc.kill()
                    proc.wait()


def server_process(
    dsn: str, port: int, log: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """`scimledger serve` (see child_process).

    One process by default: the figures (and the CPU sampled from this pid) are one server's.
    BENCH_WORKERS=N runs `serve --workers N` (CPU then counts the parent only).
    """
    return child_process(
        [
            *(str(SCIMLEDGER), "serve", "--workers", os.environ.get("BENCH_WORKERS", "1")),
            *("--port", str(port), "--database-url", dsn),
        ],
        log,
        # One token drives the whole load: the per-token rate limit and cap on requests in
        # flight (16 connections > its default 10) would measure themselves.
        env={
            **os.environ,
            "SCIMLEDGER_RATE_LIMIT": "0",
            "SCIMLEDGER_MAX_CONCURRENT_PER_TOKEN": "0",
        },
    )


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- CPU accounting ----------------------------------------------------------------------------


def client_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def process_cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def tree_cpu(root: psutil.Process) -> float:
    """A process, its live children, and its reaped children (postmaster and backends)."""
    t = root.cpu_times()
    total = float(t.user + t.system + t.children_user + t.children_system)
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += process_cpu(child)
    return total


@dataclass
class Meters:
    server: psutil.Process
    postgres: psutil.Process | None

    def read(self) -> tuple[float, float, float | None, float]:
        pg = tree_cpu(self.postgres) if self.postgres is not None else None
        return process_cpu(self.server), client_cpu(), pg, machine_busy()


# --- load --------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    stored: str
    requests: int
    seconds: float
    latencies: list[float]
    server_cpu: float
    client_cpu: float
    postgres_cpu: float | None
    machine_cpu: float  # everything on the machine, so that outside noise shows

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def row(self) -> list[str]:
        pg = "n/a" if self.postgres_cpu is None else f"{self.postgres_cpu:.1f}"
        return [
            self.name,
            self.stored,
            f"{self.requests:,}",
            f"{self.rate:,.0f}",
            f"{percentile(self.latencies, 50) * 1000:.2f}",
            f"{percentile(self.latencies, 99) * 1000:.2f}",
            f"{self.server_cpu:.1f}",
            f"{self.client_cpu:.1f}",
            pg,
        ]


One = Callable[[int], Awaitable[None]]


class Load:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base: str,
        token: str,
        concurrency: int,
        progress: Progress,
        meters: Meters,
    ) -> None:
        self.session = session
        self.base = base
        self.concurrency = concurrency
        self.progress = progress
        self.meters = meters
        self.stored = 0  # users created so far; user i has userName user_name(i)
        self.user_ids: dict[int, str] | None = None  # set to {} to keep user i's id
        self.post_seconds = 0.0  # time spent creating them, all POSTs together
        self.rng = random.Random(20240601)
        self.get_headers = {"Authorization": f"Bearer {token}", "Accept": SCIM}
        self.post_headers = {**self.get_headers, "Content-Type": SCIM}
        self.users_url = yarl.URL(f"{base}/Users", encoded=True)

    async def drive(self, label: str, n: int, one: One) -> tuple[float, list[float]]:
        """n calls of `one` from `concurrency` workers, with progress; (seconds, latencies)."""
        latencies = [0.0] * n
        counter = iter(range(n))
        task = self.progress.add_task(label, total=n, rate="")
        done = 0

        async def worker() -> None:
            nonlocal done
            for i in counter:
                t0 = time.perf_counter()
                await one(i)
                latencies[i] = time.perf_counter() - t0
                done += 1

        async def ticker(started: float) -> None:
            while True:
                await asyncio.sleep(0.25)
                self._show(task, done, started)

        started = time.perf_counter()
        tasks = [asyncio.create_task(ticker(started))]
        workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        tasks += workers
        try:
            await asyncio.gather(*workers)
        finally:  # on failure, stop the other workers before the session closes under them
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        seconds = time.perf_counter() - started
        self._show(task, done, started)
        return seconds, latencies

    def _show(self, task: TaskID, done: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        rate = f"{done / elapsed:,.0f}/s" if elapsed > 0 else ""
        self.progress.update(task, completed=done, rate=rate)

    # -- requests

    def creator(self, first: int, n: int) -> One:
        bodies = [entra_body(first + i) for i in range(n)]

        async def one(i: int) -> None:
            async with self.session.post(
                self.users_url, data=bodies[i], headers=self.post_headers
            ) as r:
                raw = await r.read()
                if r.status != 201:
                    raise BenchError(
                        f"POST /Users {user_name(first + i)} -> {r.status}: {raw[:500]!r}"
                    )
            if self.user_ids is not None:
                self.user_ids[first + i] = orjson.loads(raw)["id"]

        return one

    def finder(self, n: int) -> One:
        picks = [self.rng.randrange(self.stored) for _ in range(n)]
        wanted = [user_name(k) for k in picks]
        urls = [
            yarl.URL(
                f"{self.base}/Users?"
                + urlencode({"filter": f'userName eq "{case_varied(w, self.rng)}"'}),
                encoded=True,
            )
            for w in wanted
        ]

        async def one(i: int) -> None:
            async with self.session.get(urls[i], headers=self.get_headers) as r:
                raw = await r.read()
                if r.status != 200:
                    raise BenchError(f"GET {urls[i]} -> {r.status}: {raw[:500]!r}")
            body = orjson.loads(raw)
            found = body.get("Resources") or [{}]
            if body.get("totalResults") != 1 or found[0].get("userName") != wanted[i]:
                raise BenchError(f"GET {urls[i]} should find {wanted[i]}: {raw[:500]!r}")

        return one

    # -- phases

    async def create(self, label: str, n: int) -> tuple[float, list[float]]:
        first = self.stored
        seconds, lat = await self.drive(label, n, self.creator(first, n))
        self.stored += n
        self.post_seconds += seconds
        return seconds, lat

    async def measure(self, name: str, n: int, one: One, stored: str) -> Phase:
        server0, client0, pg0, machine0 = self.meters.read()
        seconds, lat = await self.drive(name, n, one)
        server1, client1, pg1, machine1 = self.meters.read()
        pg = None if pg0 is None or pg1 is None else pg1 - pg0
        return Phase(
            name,
            stored,
            n,
            seconds,
            lat,
            server1 - server0,
            client1 - client0,
            pg,
            machine1 - machine0,
        )

    async def measure_creates(self, n: int, warmup: int) -> Phase:
        await self.create("  warm-up POST", warmup)
        first = self.stored
        one = self.creator(first, n)  # built before the clock starts
        phase = await self.measure("POST /Users", n, one, f"{first:,} → {first + n:,}")
        self.stored += n
        self.post_seconds += phase.seconds
        return phase

    async def measure_finds(self, n: int, warmup: int) -> Phase:
        await self.drive("  warm-up GET", warmup, self.finder(warmup))
        one = self.finder(n)
        return await self.measure('GET filter=userName eq "…"', n, one, f"{self.stored:,}")

    async def seed_to(self, target: int) -> tuple[int, float]:
        """Create users through the API until `target` are stored; (created, seconds)."""
        n = target - self.stored
        if n <= 0:
            return 0, 0.0
        seconds, _ = await self.create(f"seed → {target:,} users", n)
        return n, seconds


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Args:
    users: int
    mid: int
    posts: int
    gets: int
    warmup: int
    concurrency: int
    port: int


@dataclass
class Outcome:
    phases: list[Phase]
    seeding: list[tuple[int, int, int, float]]  # (from, to, created, seconds)
    settings: str
    revision: str
    reached: tuple[int, float]  # (stored users, seconds of POSTs it took to store them)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description:<30}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
    )


def server_failure(e: BaseException, proc: subprocess.Popen[bytes], log: Path) -> BenchError:
    """A connection-level failure, with the server's state and the end of its log."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)
    state = "running" if proc.poll() is None else f"exited with {proc.returncode}"
    return BenchError(f"{type(e).__name__}: {e} (server {state})\nserver log:\n{tail(log)}")


async def wait_ready(
    session: aiohttp.ClientSession, origin: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"scimledger serve exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(f"{origin}/readyz") as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise BenchError(f"scimledger serve not ready after 120 s:\n{tail(log)}")


async def postgres_facts(dsn: str) -> tuple[psutil.Process | None, str]:
    postmaster: psutil.Process | None = None
    conn = await asyncpg.connect(dsn)
    try:
        fsync = await conn.fetchval("SHOW fsync")
        sync_commit = await conn.fetchval("SHOW synchronous_commit")
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        # The backend's parent is the postmaster, if the server runs on this machine (a remote
        # DATABASE_URL gets no CPU column). Looked up while the backend is still alive.
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(backend).parent()
            if parent is not None and parent.name() == "postgres":
                postmaster = parent
    finally:
        await conn.close()
    return postmaster, f"fsync={fsync} synchronous_commit={sync_commit}"


async def bench(
    args: Args, dsn: str, token: str, proc: subprocess.Popen[bytes], log: Path, rev: str
) -> Outcome:
    origin = f"http://127.0.0.1:{args.port}"
    postmaster, settings = await postgres_facts(dsn)
    meters = Meters(psutil.Process(proc.pid), postmaster)
    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    phases: list[Phase] = []
    reached = (0, 0.0)
    seeding: list[tuple[int, int, int, float]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await wait_ready(session, origin, proc, log)
        with progress_bar() as progress:
            load = Load(session, f"{origin}/scim/v2", token, args.concurrency, progress, meters)
            try:
                for size in dict.fromkeys((args.mid, args.users)):
                    start = load.stored
                    created, seconds = await load.seed_to(size)
                    seeding.append((start, load.stored, created, seconds))
                    reached = (load.stored, load.post_seconds)
                    phases.append(await load.measure_finds(args.gets, args.warmup))
                    phases.append(await load.measure_creates(args.posts, args.warmup))
            except (aiohttp.ClientError, OSError) as e:
                raise server_failure(e, proc, log) from e
    if proc.poll() is not None:
        raise BenchError(f"scimledger serve exited with {proc.returncode}:\n{tail(log)}")
    return Outcome(phases, seeding, settings, rev, reached)


def report(args: Args, outcome: Outcome) -> None:
    title = f"SCIM Users as Entra uses them, concurrency {args.concurrency}"
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("phase", "stored users") else "right")
    rows = [p.row() for p in outcome.phases]
    for row in rows:
        table.add_row(*row)
    notes = []
    for start, end, created, seconds in outcome.seeding:
        if created:
            notes.append(
                f"seeding {start:,} → {end:,} users through POST /Users: {created:,} in"
                f" {seconds:,.0f} s ({created / seconds:,.0f}/s)"
            )
    stored, seconds = outcome.reached
    notes.append(
        f"{stored:,} users stored through POST /Users (seeding, warm-ups and measured POSTs)"
        f" in {seconds:,.0f} s of POSTing ({stored / seconds:,.0f}/s)"
    )
    for p in outcome.phases:
        busy = p.client_cpu / p.seconds
        if busy > 0.7:
            notes.append(
                f"{p.name} at {p.stored}: the client was busy {busy:.0%} of a core;"
                " it may be the bottleneck"
            )
        if p.postgres_cpu is not None:
            other = p.machine_cpu - p.server_cpu - p.client_cpu - p.postgres_cpu
            if other > 0.1 * p.seconds:
                notes.append(
                    f"{p.name} at {p.stored}: other processes used {other:.1f} CPU s"
                    f" ({other / p.seconds:.0%} of a core); the machine was not quiet"
                )
    cores = os.cpu_count() or 1
    busiest = max(outcome.phases, key=lambda p: p.machine_cpu / p.seconds)
    notes.append(
        f"machine CPU use in the phases: up to {busiest.machine_cpu / busiest.seconds:.2f}"
        f" of {cores} cores ({busiest.name} at {busiest.stored})"
    )
    footer = f"server at {outcome.revision}; {outcome.settings}; {machine()}"
    out = Console(width=None if sys.stdout.isatty() else 160)
    out.print(table)
    for line in notes:
        out.print(line)
    out.print(footer)

    md = [
        "# bench.users",
        "",
        f"{title}; `.venv/bin/python -m bench.users --users {args.users} --posts {args.posts}"
        f" --gets {args.gets}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        *(f"- {line}" for line in notes),
        f"- {footer}",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(md))
    out.print(f"written to {RESULTS.relative_to(ROOT)}")


@dataclass
class Served:
    dsn: str
    token: str
    proc: subprocess.Popen[bytes]
    log: Path
    revision: str


@contextlib.contextmanager
def served(port: int, prefix: str) -> Iterator[Served]:
    """A durable PostgreSQL, a tenant and `scimledger serve` on `port`, all stopped on the way
    out whatever happened (a second Ctrl-C cannot interrupt stopping them)."""
    with contextlib.ExitStack() as stack:
        # Runs last: put Ctrl-C back. (The callback pushed below runs first: a second Ctrl-C
        # must not interrupt stopping the server and PostgreSQL.)
        stack.callback(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT))
        err.print("starting a durable embedded PostgreSQL …")
        dsn = stack.enter_context(durable_postgres())
        token = create_tenant(dsn)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        log = tmp / "serve.log"
        rev = revision()  # the code the server is about to load
        proc = stack.enter_context(server_process(dsn, port, log))
        stack.callback(signal.signal, signal.SIGINT, signal.SIG_IGN)
        yield Served(dsn, token, proc, log, rev)


def run(args: Args) -> int:
    import uvloop

    with served(args.port, "bench-users-") as s:
        try:
            outcome = uvloop.run(bench(args, s.dsn, s.token, s.proc, s.log, s.revision))
        except BenchError as e:
            err.print(f"[red]benchmark failed:[/red] {e}", markup=True, highlight=False)
            return 1
    report(args, outcome)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=100_000, help="final number of users")
    parser.add_argument("--mid", type=int, default=10_000, help="first GET measurement size")
    parser.add_argument("--posts", type=int, default=30_000, help="measured POSTs per size")
    parser.add_argument("--gets", type=int, default=100_000, help="measured GETs per size")
    parser.add_argument("--warmup", type=int, default=500, help="warm-up requests per phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    ns = parser.parse_args(argv)
    if not 0 < ns.mid <= ns.users or min(ns.posts, ns.gets, ns.warmup, ns.concurrency) < 1:
        parser.error("need 0 < mid <= users and positive counts")
    # SIGTERM ends the run like Ctrl-C does, so the server and PostgreSQL are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args = Args(
        ns.users, ns.mid, ns.posts, ns.gets, ns.warmup, ns.concurrency, ns.port or free_port()
    )
    try:
        return run(args)
    except KeyboardInterrupt:
        err.print("interrupted; server and PostgreSQL stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
