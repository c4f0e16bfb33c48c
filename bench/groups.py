"""Group membership changes as a group grows, the way Entra sends them, against `scimledger serve`.

    .venv/bin/python -m bench.groups [--sizes 10,10000,100000] [--pairs N] [--quick]

Three groups are created with Entra's `POST /Groups` body (with the ADSCIM schema URN) and grown
to `--sizes` members (10, 10,000 and 100,000) with Entra's member adds: `PATCH` `{"op":"Add",
"path":"members","value":[{"$ref":null,"value":id}, ...]}`, `--batch` (500) ids per PATCH. The
users are seeded first through `POST /Users` at concurrency 16. Then, for every size:

- (a) adding one member that is not in the group, then (b) removing it again in Entra's default
  style (`{"op":"Remove","path":"members","value":[{"$ref":null,"value":id}]}`): `--pairs`
  add/remove pairs, with add and remove timed separately;
- (c) `GET /Groups/{id}?excludedAttributes=members`, `--gets` times;
- (d) once: `GET /Groups/{id}` with every member, timed to the last byte, with the server's RSS
  before, at its peak during, and after the response (members are streamed, so it should
  barely move).

(a)-(c) run one request at a time: that is the headline, because writes to one group serialise
by design (a row lock orders them) and so concurrency only adds queueing. The sizes take turns
in `--rounds` rounds so that noise from a shared machine falls on all of them alike. Afterwards
the same is run at `--concurrency` 16 per group (writes per second one group sustains; reads do
not serialise), unless `--concurrency 1`.

The target: adding and removing one member of the largest group costs within 1.2x of the
smallest (p50). The table is also written as markdown to bench/results/groups-latest.md. The
server runs on a durable embedded PostgreSQL, as in bench.users, and is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
import psutil
import yarl
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table

from bench.common import machine, percentile
from bench.users import (
    ROOT,
    SCIM,
    BenchError,
    Load,
    Meters,
    One,
    Phase,
    err,
    free_port,
    postgres_facts,
    progress_bar,
    served,
    server_failure,
    wait_ready,
)

RESULTS = ROOT / "bench" / "results" / "groups-latest.md"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
AD_GROUP_SCHEMA = "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SEED_CONCURRENCY = 16
TARGET = 1.2  # largest / smallest, add and remove p50
FULL_GET_LIMIT = 1.0  # seconds, for the largest group
COLUMNS = (
    "members",
    "add p50 ms",
    "add p99 ms",
    "add mean ms",
    "remove p50 ms",
    "remove p99 ms",
    "remove mean ms",
    "GET excl. p50 ms",
    "GET excl. p99 ms",
    "full GET s",
    "response MB",
    "server RSS MB before → peak → after",
)
CONCURRENT_COLUMNS = (
    "members",
    "writes/s",
    "add p50 ms",
    "add p99 ms",
    "remove p50 ms",
    "remove p99 ms",
    "GET excl. req/s",
    "GET excl. p50 ms",
    "GET excl. p99 ms",
)
DEFAULT_SIZES = (10, 10_000, 100_000)
QUICK_SIZES = (10, 1_000, 10_000)

# --- what Entra sends --------------------------------------------------------------------------


def group_body(name: str) -> bytes:
    """Entra's POST /Groups: no members (they follow by PATCH), the ADSCIM schema URN."""
    return orjson.dumps(
        {
            "schemas": [GROUP_SCHEMA, AD_GROUP_SCHEMA],
            "externalId": str(uuid.uuid4()),
            "displayName": name,
            "meta": {"resourceType": "Group"},
        }
    )


def members_patch(op: str, ids: Sequence[str]) -> bytes:
    """Entra's default style, for adds and for removes: the members in `value`."""
    value = [{"$ref": None, "value": i} for i in ids]
    return orjson.dumps(
        {"schemas": [PATCH_OP], "Operations": [{"op": op, "path": "members", "value": value}]}
    )


# --- results -----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


@dataclass
class Cpu:
    """CPU seconds spent while one kind of request ran (summed over the rounds)."""

    server: float = 0.0
    client: float = 0.0
    postgres: float | None = 0.0
    machine: float = 0.0
    seconds: float = 0.0

    def add(
        self, before: tuple[float, float, float | None, float], seconds: float, m: Meters
    ) -> None:
        server, client, pg, busy = m.read()
        self.server += server - before[0]
        self.client += client - before[1]
        if self.postgres is not None and pg is not None and before[2] is not None:
            self.postgres += pg - before[2]
        else:
            self.postgres = None
        self.machine += busy - before[3]
        self.seconds += seconds


@dataclass
class FullGet:
    seconds: float  # to the last byte
    first_byte: float
    size: int  # bytes
    rss_before: int
    rss_peak: int
    rss_after: int


@dataclass
class Growth:
    size: int
    seconds: float
    batches: list[float]  # each PATCH's latency, in order


@dataclass
class Measured:
    """One group's numbers."""

    size: int
    group_id: str
    add: list[float] = field(default_factory=list)
    remove: list[float] = field(default_factory=list)
    get: list[float] = field(default_factory=list)
    write_cpu: Cpu = field(default_factory=Cpu)
    full: FullGet | None = None
    # at --concurrency
    c_add: list[float] = field(default_factory=list)
    c_remove: list[float] = field(default_factory=list)
    c_pairs: Phase | None = None
    c_gets: Phase | None = None

    def row(self) -> list[str]:
        full = self.full
        return [
            f"{self.size:,}",
            ms(percentile(self.add, 50)),
            ms(percentile(self.add, 99)),
            ms(statistics.fmean(self.add)),
            ms(percentile(self.remove, 50)),
            ms(percentile(self.remove, 99)),
            ms(statistics.fmean(self.remove)),
            ms(percentile(self.get, 50)),
            ms(percentile(self.get, 99)),
            "n/a" if full is None else f"{full.seconds:.3f}",
            "n/a" if full is None else mb(full.size),
            "n/a"
            if full is None
            else f"{mb(full.rss_before)} → {mb(full.rss_peak)} → {mb(full.rss_after)}",
        ]

    def concurrent_row(self) -> list[str]:
        pairs, gets = self.c_pairs, self.c_gets
        assert pairs is not None and gets is not None
        return [
            f"{self.size:,}",
            f"{2 * pairs.requests / pairs.seconds:,.0f}",
            ms(percentile(self.c_add, 50)),
            ms(percentile(self.c_add, 99)),
            ms(percentile(self.c_remove, 50)),
            ms(percentile(self.c_remove, 99)),
            f"{gets.rate:,.0f}",
            ms(percentile(gets.latencies, 50)),
            ms(percentile(gets.latencies, 99)),
        ]


# --- requests ----------------------------------------------------------------------------------


class Client:
    """The group requests, on the benchmark's session; every reply is checked."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        self.session = session
        self.base = base
        self.get_headers = {"Authorization": f"Bearer {token}", "Accept": SCIM}
        self.write_headers = {**self.get_headers, "Content-Type": SCIM}

    def url(self, group_id: str, query: str = "") -> yarl.URL:
        return yarl.URL(f"{self.base}/Groups/{group_id}{query}", encoded=True)

    def group_body(self, name: str) -> bytes:
        return group_body(name)

    async def create(self, name: str) -> str:
        async with self.session.post(
            yarl.URL(f"{self.base}/Groups", encoded=True),
            data=self.group_body(name),
            headers=self.write_headers,
        ) as r:
            raw = await r.read()
            if r.status != 201:
                raise BenchError(f"POST /Groups {name!r} -> {r.status}: {raw[:500]!r}")
        group_id: str = orjson.loads(raw)["id"]
        return group_id

    async def patch(self, url: yarl.URL, body: bytes) -> None:
        async with self.session.patch(url, data=body, headers=self.write_headers) as r:
            raw = await r.read()
            if r.status not in (200, 204):
                raise BenchError(f"PATCH {url.path} -> {r.status}: {raw[:500]!r}")

    async def get_excluded(self, url: yarl.URL, group_id: str) -> None:
        async with self.session.get(url, headers=self.get_headers) as r:
            raw = await r.read()
            if r.status != 200:
                raise BenchError(f"GET {url.path}?{url.query_string} -> {r.status}: {raw[:500]!r}")
        body = orjson.loads(raw)
        if body.get("id") != group_id or "members" in body:
            raise BenchError(f"GET {url} must be the group without members: {raw[:500]!r}")

    async def get_full(self, group_id: str, size: int, server: psutil.Process) -> FullGet:
        """The whole group, timed to its last byte, with the server's RSS around and during it."""
        url = self.url(group_id)
        rss_before = server.memory_info().rss
        peak = rss_before
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                with contextlib.suppress(psutil.Error):
                    peak = max(peak, server.memory_info().rss)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.005)

        sampler = asyncio.create_task(sample())
        chunks: list[bytes] = []
        try:
            t0 = time.perf_counter()
            async with self.session.get(url, headers=self.get_headers) as r:
                first_byte = time.perf_counter() - t0
                async for chunk in r.content.iter_chunked(1 << 16):
                    chunks.append(chunk)
                seconds = time.perf_counter() - t0
                status = r.status
        finally:
            stop.set()
            await sampler
        raw = b"".join(chunks)
        rss_after = server.memory_info().rss
        peak = max(peak, rss_after)
        if status != 200:
            raise BenchError(f"GET {url.path} -> {status}: {raw[:500]!r}")
        body = orjson.loads(raw)
        got = len(body.get("members") or [])
        if body.get("id") != group_id or got != size:
            raise BenchError(f"GET {url.path} should list {size:,} members, not {got:,}")
        return FullGet(seconds, first_byte, len(raw), rss_before, peak, rss_after)


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Args:
    sizes: tuple[int, ...]
    pairs: int
    gets: int
    rounds: int
    warmup: int
    batch: int
    spare: int
    concurrency: int
    port: int
    quick: bool

    def command(self) -> str:
        return (
            ".venv/bin/python -m bench.groups"
            + (" --quick" if self.quick else "")
            + f" --sizes {','.join(map(str, self.sizes))} --pairs {self.pairs}"
            f" --gets {self.gets} --batch {self.batch} --concurrency {self.concurrency}"
        )


@dataclass
class Outcome:
    groups: list[Measured]
    growth: list[Growth]
    seeded: tuple[int, float]  # users, seconds
    settings: str
    revision: str


class Bench:
    def __init__(self, args: Args, client: Client, progress: Progress, meters: Meters) -> None:
        self.args = args
        self.client = client
        self.progress = progress
        self.meters = meters
        self.spare: list[str] = []  # users in no group: the ones added and removed
        self.turn = 0  # spare users used so far (each pair takes the next)

    def pair_bodies(self, user: str) -> tuple[bytes, bytes]:
        return members_patch("Add", [user]), members_patch("Remove", [user])

    async def grow(self, group: Measured, members: Sequence[str]) -> Growth:
        url = self.client.url(group.group_id)
        bodies = [
            members_patch("Add", members[i : i + self.args.batch])
            for i in range(0, len(members), self.args.batch)
        ]
        task = self.progress.add_task(
            f"grow → {len(members):,} members", total=len(members), rate=""
        )
        latencies = []
        started = time.perf_counter()
        for k, body in enumerate(bodies):
            t0 = time.perf_counter()
            await self.client.patch(url, body)
            latencies.append(time.perf_counter() - t0)
            done = min(len(members), (k + 1) * self.args.batch)
            rate = done / (time.perf_counter() - started)
            self.progress.update(task, completed=done, rate=f"{rate:,.0f}/s")
        return Growth(len(members), time.perf_counter() - started, latencies)

    async def pairs(self, group: Measured, n: int, task: TaskID | None, keep: bool = True) -> None:
        """n add/remove pairs, one request at a time, each with the next spare user."""
        url = self.client.url(group.group_id)
        bodies = [self.pair_bodies(self.spare[(self.turn + k) % len(self.spare)]) for k in range(n)]
        self.turn += n
        before = self.meters.read()
        started = time.perf_counter()
        for add, remove in bodies:
            t0 = time.perf_counter()
            await self.client.patch(url, add)
            t1 = time.perf_counter()
            await self.client.patch(url, remove)
            t2 = time.perf_counter()
            if keep:
                group.add.append(t1 - t0)
                group.remove.append(t2 - t1)
            if task is not None:
                self.progress.advance(task)
        if keep:
            group.write_cpu.add(before, time.perf_counter() - started, self.meters)

    async def gets(self, group: Measured, n: int, task: TaskID | None, keep: bool = True) -> None:
        url = self.client.url(group.group_id, "?excludedAttributes=members")
        for _ in range(n):
            t0 = time.perf_counter()
            await self.client.get_excluded(url, group.group_id)
            if keep:
                group.get.append(time.perf_counter() - t0)
            if task is not None:
                self.progress.advance(task)

    async def sequential(self, groups: list[Measured]) -> None:
        """Warm-up, then the rounds: every size in turn, so that noise hits them all alike."""
        args = self.args
        for g in groups:
            await self.pairs(g, args.warmup, None, keep=False)
            await self.gets(g, args.warmup, None, keep=False)
        pair_tasks = {
            g.size: self.progress.add_task(
                f"add+remove, {g.size:,} members", total=args.pairs, rate=""
            )
            for g in groups
        }
        get_tasks = {
            g.size: self.progress.add_task(
                f"GET excl., {g.size:,} members", total=args.gets, rate=""
            )
            for g in groups
        }
        for r in range(args.rounds):
            for g in groups:
                n_pairs = _share(args.pairs, args.rounds, r)
                n_gets = _share(args.gets, args.rounds, r)
                await self.pairs(g, n_pairs, pair_tasks[g.size])
                await self.gets(g, n_gets, get_tasks[g.size])

    async def concurrent(self, load: Load, group: Measured) -> None:
        """The same at --concurrency on one group: how many writes per second it takes."""
        args = self.args
        url = self.client.url(group.group_id)
        n = args.pairs
        # Every request in flight has its own user: concurrent pairs never share one.
        bodies = [self.pair_bodies(self.spare[(self.turn + k) % len(self.spare)]) for k in range(n)]
        self.turn += n
        group.c_add = [0.0] * n
        group.c_remove = [0.0] * n

        async def pair(i: int) -> None:
            add, remove = bodies[i]
            t0 = time.perf_counter()
            await self.client.patch(url, add)
            t1 = time.perf_counter()
            await self.client.patch(url, remove)
            group.c_add[i] = t1 - t0
            group.c_remove[i] = time.perf_counter() - t1

        get_url = self.client.url(group.group_id, "?excludedAttributes=members")

        async def get(_: int) -> None:
            await self.client.get_excluded(get_url, group.group_id)

        stored = f"{group.size:,}"
        group.c_pairs = await load.measure(
            f"add+remove x{args.concurrency}, {stored}", n, pair, stored
        )
        one: One = get
        group.c_gets = await load.measure(
            f"GET excl. x{args.concurrency}, {stored}", args.gets, one, stored
        )


def _share(total: int, parts: int, k: int) -> int:
    """Part k of `total` split into `parts` nearly equal whole parts."""
    return total // parts + (1 if k < total % parts else 0)


async def bench(
    args: Args, dsn: str, token: str, proc: subprocess.Popen[bytes], log: Path, rev: str
) -> Outcome:
    origin = f"http://127.0.0.1:{args.port}"
    postmaster, settings = await postgres_facts(dsn)
    server = psutil.Process(proc.pid)
    meters = Meters(server, postmaster)
    connections = max(SEED_CONCURRENCY, args.concurrency)
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    timeout = aiohttp.ClientTimeout(total=120)
    largest = max(args.sizes)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await wait_ready(session, origin, proc, log)
        base = f"{origin}/scim/v2"
        client = Client(session, base, token)
        with progress_bar() as progress:
            try:
                seeder = Load(session, base, token, SEED_CONCURRENCY, progress, meters)
                seeder.user_ids = {}
                users = largest + args.spare
                _, seed_seconds = await seeder.seed_to(users)
                ids = [seeder.user_ids[i] for i in range(users)]
                run = Bench(args, client, progress, meters)
                run.spare = ids[largest:]
                groups = [
                    Measured(size, await client.create(f"Bench Group {size:,}"))
                    for size in args.sizes
                ]
                growth = [await run.grow(g, ids[: g.size]) for g in groups]
                await run.sequential(groups)
                for g in groups:  # after the pairs: the count also checks they left no trace
                    g.full = await client.get_full(g.group_id, g.size, server)
                if args.concurrency > 1:
                    load = Load(session, base, token, args.concurrency, progress, meters)
                    for g in groups:
                        await run.concurrent(load, g)
            except (aiohttp.ClientError, OSError) as e:
                raise server_failure(e, proc, log) from e
    if proc.poll() is not None:
        raise BenchError(f"scimledger serve exited with {proc.returncode}")
    return Outcome(groups, growth, (users, seed_seconds), settings, rev)


# --- the report --------------------------------------------------------------------------------


def _ratio(groups: list[Measured], pick: str) -> float:
    small, large = groups[0], groups[-1]
    p50_small = percentile(getattr(small, pick), 50)
    p50_large = percentile(getattr(large, pick), 50)
    return p50_large / p50_small


def report(args: Args, outcome: Outcome) -> None:
    groups = sorted(outcome.groups, key=lambda g: g.size)
    small, large = groups[0], groups[-1]
    title = "SCIM group membership changes as a group grows, one request at a time"
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="right")
    rows = [g.row() for g in groups]
    for row in rows:
        table.add_row(*row)

    verdicts = []
    for pick, label in (("add", "add"), ("remove", "remove")):
        ratio = _ratio(groups, pick)
        ok = ratio <= TARGET
        verdicts.append(
            (
                ok,
                f"{label} p50, {large.size:,} / {small.size:,} members: {ratio:.2f}x"
                f" (target ≤ {TARGET}x: {'met' if ok else 'MISSED'})",
            )
        )
    if large.full is not None:
        ok = large.full.seconds < FULL_GET_LIMIT
        verdicts.append(
            (
                ok,
                f"full GET of the {large.size:,}-member group: {large.full.seconds:.3f} s"
                f" (target < {FULL_GET_LIMIT:.0f} s: {'met' if ok else 'MISSED'})",
            )
        )

    notes = []
    users, seconds = outcome.seeded
    notes.append(
        f"seeded {users:,} users through POST /Users at concurrency 16 in {seconds:,.0f} s"
        f" ({users / seconds:,.0f}/s); {args.spare:,} of them in no group, for the pairs"
    )
    for gr in outcome.growth:
        if not gr.batches:
            continue
        tenth = max(1, len(gr.batches) // 10)
        first = statistics.median(gr.batches[:tenth]) * 1000
        last = statistics.median(gr.batches[-tenth:]) * 1000
        notes.append(
            f"grew a group to {gr.size:,} members in {gr.seconds:,.1f} s"
            f" ({gr.size / gr.seconds:,.0f} members/s; {len(gr.batches):,} PATCH(es) of"
            f" ≤{args.batch} ids, median {first:,.0f} ms in the first tenth, {last:,.0f} ms"
            " in the last)"
        )
    for g in groups:
        c = g.write_cpu
        writes = len(g.add) + len(g.remove)
        pg = "n/a" if c.postgres is None else f"{c.postgres / writes * 1000:.2f}"
        other = c.machine - c.server - c.client - (c.postgres or 0.0)
        busy = (
            f"; other processes used {other / c.seconds:.0%} of a core: the machine was not quiet"
            if other > 0.1 * c.seconds
            else ""
        )
        notes.append(
            f"{g.size:,} members, CPU per write (add or remove): server"
            f" {c.server / writes * 1000:.2f} ms, postgres {pg} ms, client"
            f" {c.client / writes * 1000:.2f} ms, other processes {other / writes * 1000:.2f} ms"
            + busy
        )
    for g in groups:
        for phase in (g.c_pairs, g.c_gets):
            if phase is None or phase.postgres_cpu is None:
                continue
            other = phase.machine_cpu - phase.server_cpu - phase.client_cpu - phase.postgres_cpu
            if other > 0.1 * phase.seconds:
                notes.append(
                    f"{phase.name}: other processes used {other / phase.seconds:.0%} of a core;"
                    " the machine was not quiet"
                )
    for g in groups:
        if g.full is not None:
            notes.append(
                f"full GET of {g.size:,} members: first byte after {g.full.first_byte * 1000:.1f}"
                f" ms, last after {g.full.seconds * 1000:.1f} ms, {g.full.size:,} bytes;"
                f" server RSS grew {(g.full.rss_peak - g.full.rss_before) / 1e6:+.1f} MB at its"
                f" peak"
            )
    notes.append(
        f"{args.pairs:,} add/remove pairs and {args.gets:,} GETs per size, sizes taking turns in"
        f" {args.rounds} rounds, after {args.warmup} of each as warm-up"
    )

    concurrent = None
    if all(g.c_pairs is not None and g.c_gets is not None for g in groups) and args.concurrency > 1:
        concurrent = Table(
            title=f"The same at concurrency {args.concurrency} on one group"
            " (writes queue on the group's row lock: latency is mostly waiting)"
        )
        for col in CONCURRENT_COLUMNS:
            concurrent.add_column(col, justify="right")
        for g in groups:
            concurrent.add_row(*g.concurrent_row())

    footer = f"server at {outcome.revision}; {outcome.settings}; {machine()}"
    out = Console(width=None if sys.stdout.isatty() else 200)
    out.print(table)
    for ok, line in verdicts:
        out.print(line, style="green" if ok else "bold red")
    if concurrent is not None:
        out.print(concurrent)
    for line in notes:
        out.print(line)
    out.print(footer)

    def md_table(columns: Sequence[str], body: list[list[str]]) -> list[str]:
        return [
            "| " + " | ".join(columns) + " |",
            "| " + " | ".join("---:" for _ in columns) + " |",
            *("| " + " | ".join(row) + " |" for row in body),
        ]

    md = [
        "# bench.groups",
        "",
        f"{title}; `{args.command()}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        *md_table(COLUMNS, rows),
        "",
        *(f"- **{line}**" for _, line in verdicts),
        "",
    ]
    if concurrent is not None:
        md += [
            f"At concurrency {args.concurrency} on one group (writes queue on the group's row"
            " lock: latency is mostly waiting):",
            "",
            *md_table(CONCURRENT_COLUMNS, [g.concurrent_row() for g in groups]),
            "",
        ]
    md += [*(f"- {line}" for line in notes), f"- {footer}", ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(md))
    out.print(f"written to {RESULTS.relative_to(ROOT)}")


def run(args: Args) -> int:
    import uvloop

    with served(args.port, "bench-groups-") as s:
        try:
            outcome = uvloop.run(bench(args, s.dsn, s.token, s.proc, s.log, s.revision))
        except BenchError as e:
            err.print(f"[red]benchmark failed:[/red] {e}", markup=True, highlight=False)
            return 1
    report(args, outcome)
    return 0


def _sizes(raw: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(part.replace("_", "")) for part in raw.split(",") if part}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes: {raw!r}") from None
    if len(sizes) < 2 or sizes[0] < 1:
        raise argparse.ArgumentTypeError("need at least two positive sizes")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", type=_sizes, help="group sizes, comma-separated (default 10,10000,100000)"
    )
    parser.add_argument("--pairs", type=int, help="add/remove pairs per size (default 2000)")
    parser.add_argument("--gets", type=int, help="GET excludedAttributes=members per size (2000)")
    parser.add_argument("--rounds", type=int, default=5, help="turns the sizes take (default 5)")
    parser.add_argument("--warmup", type=int, help="warm-up pairs and GETs per size (default 50)")
    parser.add_argument("--batch", type=int, default=500, help="member ids per growth PATCH")
    parser.add_argument("--spare", type=int, help="users in no group, for the pairs (1000)")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="second run's concurrency; 1 skips it"
    )
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument(
        "--quick", action="store_true", help="sizes 10,1000,10000 and 200 pairs: a fast check"
    )
    ns = parser.parse_args(argv)
    quick: bool = ns.quick
    sizes: tuple[int, ...] = ns.sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)
    pairs: int = ns.pairs or (200 if quick else 2000)
    gets: int = ns.gets or (200 if quick else 2000)
    warmup: int = ns.warmup if ns.warmup is not None else (20 if quick else 50)
    spare: int = ns.spare or (200 if quick else 1000)
    if min(pairs, gets, ns.rounds, ns.batch, spare, ns.concurrency) < 1 or warmup < 0:
        parser.error("counts must be positive")
    if ns.concurrency > spare:
        parser.error("need at least --concurrency spare users")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args = Args(
        sizes,
        pairs,
        gets,
        min(ns.rounds, pairs, gets),
        warmup,
        ns.batch,
        spare,
        ns.concurrency,
        ns.port or free_port(),
        quick,
    )
    try:
        return run(args)
    except KeyboardInterrupt:
        err.print("interrupted; server and PostgreSQL stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
