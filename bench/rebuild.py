"""Rebuild every projection from 1,000,000 events: events/s and peak memory of the rebuild.

    .venv/bin/python -m bench.rebuild [--events N] [--quick] [--tenant-events N] [--py-spy DIR]

A durable PostgreSQL (embedded, or DATABASE_URL on an empty database) is seeded with the history
of Entra tenants, every event produced by the real aggregates (`User.provision`, `user.update`,
`user.deprovision`, `Group.create`, `group.change_membership`, `group.update`, `group.delete`)
and stored through `EventStore.append_stored`, several thousand events per transaction.

Each tenant's history is an initial sync (users, then groups, then their members in batches)
followed by churn: attribute updates (department, title, names, e-mails, manager, active),
joiners, leavers (who leave every group first, as the service records it), membership batches,
group renames, nested groups and a few group deletions. Tenants are `--tenant-events` long, so
the 100,000-event size and the 1,000,000-event size have the same shape, only more of it.

Seeding writes events only. The asynchronous projections are then brought to the head by their
own runner (`Runner.step`, as `serve` would), because their rebuild replays up to their live
checkpoint; the inline views (users, groups) are written by the first measured rebuild. At each
size (100,000, then `--events`; only 100,000 with `--quick`) three runs of
`scimledger projections rebuild --all --quiet` as a subprocess:

1. rebuild: the inline views are stale (empty, or at the previous size), so it swaps new ones in;
2. rebuild --dry-run: builds the shadows and compares them with the live views (no drift
   expected: the views were just rebuilt from the same events);
3. rebuild: the steady state an operator meets, every live view current.

The command rebuilds the projections side by side, each in a worker process it forks (one
per core at a time). Per run: wall seconds of the subprocess (start-up and connecting
included), events/s counted as events x projections / seconds (every projection replays the
whole log) and, stricter, the log's events / seconds (all projections of one event), each
projection's own events/s as the CLI prints it, the peak RSS of the command and its workers
(the sum of their VmHWM, read every 50 ms), their CPU seconds (`wait4`: the command reaps its
workers) and PostgreSQL's, and the CPU everything else on the machine used meanwhile (a shared
machine shows). The table is written as markdown to
bench/results/rebuild-latest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bench.common import ROOT, SCIMLEDGER, durable_postgres, machine, machine_busy, revision
from bench.users import _die_with_parent, tree_cpu
from domain.group import Group
from domain.user import User
from infra.config import Settings
from infra.database import create_pool, open_database
from infra.eventstore import EventStore
from infra.migrations import migrate
from infra.transcoder import make_mapper
from projections.registry import PROJECTIONS
from projections.runner import Runner
from projections.state import register

RESULTS = ROOT / "bench" / "results" / "rebuild-latest.md"
SMALL = 100_000
TARGET = 50_000  # events/s, events x projections / seconds (the goal)
COLUMNS = (
    "events",
    "run",
    "seconds",
    "events/s",
    "log events/s",
    "per projection events/s",
    "peak RSS MB",
    "rebuild CPU s",
    "postgres CPU s",
    "diff",
)

err = Console(stderr=True)

Event = DomainEventProtocol[uuid.UUID]


class BenchError(Exception):
    """Something a correct rebuild would not do; reported, not worked around."""


# --- an Entra tenant's history, through the real aggregates ------------------------------------

GIVEN = (
    "Adele", "Alex", "Ben", "Chen", "Diego", "Emily", "Fatima", "Grady", "Hana", "Isaiah",
    "Joni", "Kenji", "Lee", "Lidia", "Megan", "Miriam", "Nestor", "Olga", "Patti", "Raj",
)  # fmt: skip
FAMILY = (
    "Vance", "Wilber", "Walker", "Li", "Garcia", "Braun", "Khan", "Archie", "Sato", "Moore",
    "Sherman", "Tanaka", "Gu", "Holloway", "Bowen", "Adams", "Wilke", "Petrova", "Fernandez",
    "Patel",
)  # fmt: skip
DEPARTMENTS = (
    "Sales", "Finance", "Engineering", "Legal", "Marketing", "Support", "Operations",
    "Human Resources", "IT", "Research",
)  # fmt: skip
TITLES = (
    "Associate", "Analyst", "Engineer", "Senior Engineer", "Consultant", "Specialist",
    "Manager", "Senior Manager", "Director", "Vice President",
)  # fmt: skip


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


@dataclass
class Person:
    user: User
    serial: int
    given: str
    family: str
    domain: str

    @property
    def user_name(self) -> str:
        return f"{self.given}.{self.family}{self.serial}@{self.domain}"


def entra_state(
    rng: random.Random, serial: int, given: str, family: str, domain: str, manager: str | None
) -> dict[str, Any]:
    """The body Entra sends for a new user, as the service's canonical state."""
    user_name = f"{given}.{family}{serial}@{domain}"
    return {
        "userName": user_name,
        "externalId": str(_uuid(rng)),
        "active": True,
        "displayName": f"{given} {family}",
        "name": {"formatted": f"{given} {family}", "familyName": family, "givenName": given},
        "emails": [{"primary": True, "type": "work", "value": user_name}],
        "title": rng.choice(TITLES),
        "preferredLanguage": "en-US",
        "enterprise": {
            "department": rng.choice(DEPARTMENTS),
            "employeeNumber": f"{serial:07d}",
            "costCenter": f"CC-{rng.randrange(200):03d}",
        },
        "manager": manager,
    }


@dataclass
class Team:
    group: Group
    serial: int
    members: set[str] = field(default_factory=set)
    renames: int = 0


class TenantHistory:
    """One tenant's SCIM traffic over time, as lists of events (one list per request)."""

    def __init__(self, tenant_id: uuid.UUID, budget: int, seed: int) -> None:
        self.tenant_id = tenant_id
        self.budget = budget
        self.rng = random.Random(seed)
        self.domain = f"tenant{seed}.onmicrosoft.com"
        self.people: list[Person] = []  # live users; removal swaps with the last one
        self.index: dict[str, int] = {}  # user id -> position in people
        self.teams: dict[str, Team] = {}  # live groups by id
        self.team_order: list[str] = []  # creation order of live groups (nesting goes down it)
        self.serial = 0
        self.emitted = 0

    # -- requests

    def _events(self, *aggregates: User | Group) -> list[Event]:
        out: list[Event] = []
        for aggregate in aggregates:
            out.extend(aggregate.collect_events())
        self.emitted += len(out)
        return out

    def join(self) -> list[Event]:
        """POST /Users of a joiner; most have a manager among the live users."""
        rng = self.rng
        self.serial += 1
        user_id = _uuid(rng)
        manager = None
        if self.people and rng.random() < 0.85:
            manager = str(rng.choice(self.people).user.id)
        given, family = rng.choice(GIVEN), rng.choice(FAMILY)
        state = entra_state(rng, self.serial, given, family, self.domain, manager)
        user = User.provision(user_id, self.tenant_id, state)
        person = Person(user, self.serial, given, family, self.domain)
        self.index[str(user_id)] = len(self.people)
        self.people.append(person)
        return self._events(person.user)

    def update(self) -> list[Event]:
        """PATCH /Users from an attribute change in Entra (one or two attributes)."""
        rng = self.rng
        person = rng.choice(self.people)
        user = person.user
        desired = user.state
        enterprise = dict(desired.get("enterprise", {}))
        for _ in range(1 if rng.random() < 0.8 else 2):
            kind = rng.random()
            if kind < 0.30:
                enterprise["department"] = rng.choice(DEPARTMENTS)
            elif kind < 0.50:
                desired["title"] = rng.choice(TITLES)
            elif kind < 0.62:
                enterprise["costCenter"] = f"CC-{rng.randrange(200):03d}"
            elif kind < 0.74:
                desired["manager"] = str(rng.choice(self.people).user.id)
                if desired["manager"] == str(user.id):
                    desired.pop("manager")
            elif kind < 0.84:  # a new family name: display name, name, userName and e-mail
                person.family = rng.choice(FAMILY)
                full = f"{person.given} {person.family}"
                user_name = person.user_name
                desired["displayName"] = full
                desired["name"] = {
                    "formatted": full,
                    "familyName": person.family,
                    "givenName": person.given,
                }
                desired["userName"] = user_name
                desired["emails"] = [{"primary": True, "type": "work", "value": user_name}]
            elif kind < 0.90:  # a second address, or back to one
                emails = desired.get("emails", [])
                if len(emails) > 1:
                    desired["emails"] = emails[:1]
                else:
                    other = {"type": "other", "value": f"{person.serial}@alias.{person.domain}"}
                    desired["emails"] = [*emails, other]
            elif kind < 0.95:
                desired["phoneNumbers"] = [
                    {"type": "work", "value": f"+1 555 {rng.randrange(10**7):07d}"}
                ]
            else:  # disabled in Entra, or enabled again
                desired["active"] = not desired.get("active", True)
        desired["enterprise"] = enterprise
        user.update(desired)
        return self._events(user)

    def leave(self) -> list[Event]:
        """DELETE /Users of a leaver: out of every group (membership events), then gone."""
        person = self.rng.choice(self.people)
        user_id = str(person.user.id)
        touched: list[User | Group] = []
        for team in self.teams.values():
            if user_id in team.members:
                team.members.discard(user_id)
                team.group.change_membership([], [user_id])
                touched.append(team.group)
        person.user.deprovision()
        at = self.index.pop(user_id)
        last = self.people.pop()
        if last is not person:
            self.people[at] = last
            self.index[str(last.user.id)] = at
        return self._events(person.user, *touched)

    def create_group(self) -> list[Event]:
        rng = self.rng
        self.serial += 1
        kind = rng.choice(("Team", "Project", "Site", "Role", "App access"))
        group = Group.create(
            _uuid(rng), self.tenant_id, f"{kind} {self.serial}", external_id=str(_uuid(rng))
        )
        gid = str(group.id)
        self.teams[gid] = Team(group, self.serial)
        self.team_order.append(gid)
        return self._events(group)

    def add_members(self, team: Team | None = None, size: int | None = None) -> list[Event]:
        """PATCH /Groups add members, in a batch of Entra's size (up to 50 here)."""
        rng = self.rng
        team = team or self.teams[rng.choice(self.team_order)]
        size = size or rng.choice((1, 1, 2, 3, 5, 10, 20, 50))
        picks = {str(rng.choice(self.people).user.id) for _ in range(size)} - team.members
        if not picks:
            return []
        displays = {m: f"member {m[:8]}" for m in picks if rng.random() < 0.1}
        team.group.change_membership(sorted(picks), [], displays)
        team.members |= picks
        return self._events(team.group)

    def remove_members(self) -> list[Event]:
        rng = self.rng
        team = self.teams[rng.choice(self.team_order)]
        if not team.members:
            return self.add_members(team)
        users = [m for m in team.members if m in self.index]
        gone = set(rng.sample(users, min(len(users), rng.choice((1, 1, 2, 5, 10)))))
        if not gone:
            return []
        team.group.change_membership([], sorted(gone))
        team.members -= gone
        return self._events(team.group)

    def nest(self) -> list[Event]:
        """A group added to a group created after it: nesting goes one way, never a cycle."""
        if len(self.team_order) < 2:
            return []
        a, b = sorted(self.rng.sample(range(len(self.team_order)), 2))
        child, parent = self.team_order[a], self.teams[self.team_order[b]]
        if child in parent.members:
            return []
        parent.group.change_membership([child], [])
        parent.members.add(child)
        return self._events(parent.group)

    def rename_group(self) -> list[Event]:
        team = self.teams[self.rng.choice(self.team_order)]
        team.renames += 1
        name = team.group.display_name.split(" (", 1)[0]
        team.group.update(f"{name} (v{team.renames + 1})", team.group.external_id)
        return self._events(team.group)

    def delete_group(self) -> list[Event]:
        """DELETE /Groups: out of the groups it is nested in, then gone."""
        if len(self.team_order) < 10:
            return []
        gid = self.rng.choice(self.team_order)
        team = self.teams.pop(gid)
        self.team_order.remove(gid)
        touched: list[Group] = []
        for parent in self.teams.values():
            if gid in parent.members:
                parent.members.discard(gid)
                parent.group.change_membership([], [gid])
                touched.append(parent.group)
        team.group.delete()
        return self._events(team.group, *touched)

    # -- the story

    def requests(self) -> Iterator[list[Event]]:
        """Initial sync, then churn, until the budget is spent (the last request may overrun)."""
        rng = self.rng
        users = max(10, self.budget * 12 // 100)
        for _ in range(users):
            if self.emitted >= self.budget:
                return
            yield self.join()
        for _ in range(max(10, users // 30)):
            if self.emitted >= self.budget:
                return
            yield self.create_group()
        # Everyone in one all-staff group, and in two or three others, in batches.
        everyone = self.teams[self.team_order[0]]
        ids = [str(p.user.id) for p in self.people]
        for start in range(0, len(ids), 50):
            if self.emitted >= self.budget:
                return
            batch = set(ids[start : start + 50])
            everyone.group.change_membership(sorted(batch), [])
            everyone.members |= batch
            yield self._events(everyone.group)
        for _ in range(len(ids) * 3 // 20):
            if self.emitted >= self.budget:
                return
            if events := self.add_members(size=20):
                yield events
        churn = (
            (0.50, self.update),
            (0.16, self.add_members),
            (0.09, self.remove_members),
            (0.12, self.join),
            (0.08, self.leave),
            (0.025, self.rename_group),
            (0.012, self.create_group),
            (0.005, self.nest),
            (0.008, self.delete_group),
        )
        weights = [w for w, _ in churn]
        steps = [s for _, s in churn]
        while self.emitted < self.budget:
            (step,) = rng.choices(steps, weights)
            if step is self.leave and len(self.people) < 50:
                step = self.join
            if events := step():
                yield events


# --- seeding -----------------------------------------------------------------------------------


@dataclass
class Chunk:
    tenant_id: uuid.UUID
    stored: list[StoredEvent]
    topics: dict[str, int]


@dataclass
class Seeded:
    events: int = 0
    seconds: float = 0.0
    topics: dict[str, int] = field(default_factory=dict)
    tenants: int = 0


def _chunks(history: TenantHistory, mapper: Mapper[uuid.UUID], size: int) -> Iterator[Chunk]:
    """A tenant's requests, several thousand events to a transaction (never split a request)."""
    stored: list[StoredEvent] = []
    topics: dict[str, int] = {}
    for request in history.requests():
        for event in request:
            s = mapper.to_stored_event(event)
            stored.append(s)
            name = s.topic.rsplit(".", 1)[-1]
            topics[name] = topics.get(name, 0) + 1
        if len(stored) >= size:
            yield Chunk(history.tenant_id, stored, topics)
            stored, topics = [], {}
    if stored:
        yield Chunk(history.tenant_id, stored, topics)


async def seed(
    pool: asyncpg.Pool,
    seeded: Seeded,
    target: int,
    tenant_events: int,
    writers: int,
    chunk_size: int,
    progress: Progress,
) -> None:
    """Append tenants' histories until the store holds `target` events.

    Generating events is Python work on this process; PostgreSQL inserts the previous chunk
    meanwhile. A tenant's chunks all go to one writer, in order, so its events are in commit
    order in the log (a member is added after it was provisioned); tenants are independent.
    """
    store = EventStore(pool)
    mapper = make_mapper()
    queues: list[asyncio.Queue[Chunk | None]] = [asyncio.Queue(maxsize=2) for _ in range(writers)]
    task = progress.add_task(f"seed → {target:,} events", total=target - seeded.events, rate="")
    started = time.perf_counter()
    done = 0

    async def writer(queue: asyncio.Queue[Chunk | None]) -> None:
        nonlocal done
        async with pool.acquire() as conn:
            while (chunk := await queue.get()) is not None:
                async with conn.transaction():
                    # Seeding only: its commits need not wait for their WAL flush (the
                    # measured rebuilds run with the server's own settings).
                    await conn.execute("SET LOCAL synchronous_commit = off")
                    await store.append_stored(
                        conn, chunk.tenant_id, chunk.stored, request_id="bench-seed"
                    )
                done += len(chunk.stored)
                elapsed = time.perf_counter() - started
                progress.update(task, completed=done, rate=f"{done / elapsed:,.0f}/s")

    # A failing writer cancels the generator at its next put (and the other writer).
    async with asyncio.TaskGroup() as writers_group:
        for q in queues:
            writers_group.create_task(writer(q))
        while seeded.events < target:
            budget = min(tenant_events, target - seeded.events)
            tenant_id = uuid.uuid4()
            await pool.execute(
                "INSERT INTO tenants (id, name) VALUES ($1, $2)",
                tenant_id,
                f"bench-{seeded.tenants:03d}-{tenant_id.hex[:8]}",
            )
            queue = queues[seeded.tenants % writers]
            seeded.tenants += 1
            history = TenantHistory(tenant_id, budget, seed=seeded.tenants)
            for chunk in _chunks(history, mapper, chunk_size):
                await queue.put(chunk)
                seeded.events += len(chunk.stored)
                for name, n in chunk.topics.items():
                    seeded.topics[name] = seeded.topics.get(name, 0) + n
        for q in queues:
            await q.put(None)
    seeded.seconds += time.perf_counter() - started
    stored = int(await pool.fetchval("SELECT count(*) FROM stored_events"))
    if stored != seeded.events:
        raise BenchError(f"seeded {seeded.events:,} events but the store holds {stored:,}")


async def catch_up_async(dsn: str, progress: Progress) -> float:
    """Bring the asynchronous projections to the head with their own runner's step, as a
    `serve` would have done; their rebuild replays up to that checkpoint. Returns seconds."""
    started = time.perf_counter()
    async with open_database(Settings(database_url=dsn, run_projections=False)) as db:
        conn = await db.connect()
        try:
            for projection in PROJECTIONS.values():
                if projection.mode != "async":
                    continue
                await register(conn, [projection])
                runner = Runner(db, projection, batch_size=5000)
                task = progress.add_task(f"{projection.name} runner catch-up", total=None, rate="")
                while await runner.step(conn):
                    rate = runner.applied / (time.perf_counter() - started)
                    progress.update(task, completed=runner.applied, rate=f"{rate:,.0f}/s")
                progress.update(task, total=runner.applied)
        finally:
            await conn.close()
    return time.perf_counter() - started


# --- measuring one rebuild ---------------------------------------------------------------------


@dataclass
class Run:
    size: int
    name: str
    seconds: float
    # bytes: the sum of the VmHWM (high-water mark) of the command and of every process it
    # started (workers rebuilding side by side), read every 50 ms: an upper bound of its peak
    peak_rss: int
    sampled_rss: int  # bytes: the highest sum of their RSS seen in those samples
    cpu: float
    other_cpu: float | None  # CPU seconds of everything else on the machine meanwhile
    postgres_cpu: float | None
    projections: dict[str, tuple[int, float, float]]  # name -> (events, seconds, events/s)
    diffs: dict[str, tuple[int, int, int]]  # table -> (added, removed, changed)
    output: str

    @property
    def rate(self) -> float:
        return sum(n for n, _, _ in self.projections.values()) / self.seconds

    def row(self) -> list[str]:
        per = ", ".join(f"{k} {r:,.0f}" for k, (_, _, r) in self.projections.items())
        pg = "n/a" if self.postgres_cpu is None else f"{self.postgres_cpu:.1f}"
        return [
            f"{self.size:,}",
            self.name,
            f"{self.seconds:.1f}",
            f"{self.rate:,.0f}",
            f"{self.size / self.seconds:,.0f}",
            per,
            f"{self.peak_rss / 2**20:,.0f}",
            f"{self.cpu:.1f}",
            pg,
            self.diff_text(),
        ]

    def diff_text(self) -> str:
        added = sum(a for a, _, _ in self.diffs.values())
        removed = sum(r for _, r, _ in self.diffs.values())
        changed = sum(c for _, _, c in self.diffs.values())
        if not (added or removed or changed):
            return "none"
        return f"+{added:,} -{removed:,} ~{changed:,}"


REPORT = re.compile(r"^(\w+): (\d+) events in ([\d.]+)s \(([\d,]+) events/s[;)]")
DIFF = re.compile(r"^  (\w+): (\d+) added, (\d+) removed, (\d+) changed")


def high_water(pid: int) -> int:
    """VmHWM: the peak RSS of the process since its exec (0 if unknown, e.g. not Linux).

    Not `wait4`'s ru_maxrss: on Linux a child created by fork inherits the parent's high-water
    mark through exec, so it reports at least this benchmark's own size.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def postmaster_of(dsn: str) -> tuple[psutil.Process | None, str]:
    """The postmaster, if the server runs on this machine, and its durability settings."""
    conn = await asyncpg.connect(dsn)
    postmaster: psutil.Process | None = None
    try:
        fsync = await conn.fetchval("SHOW fsync")
        sync_commit = await conn.fetchval("SHOW synchronous_commit")
        version = await conn.fetchval("SHOW server_version")
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(backend).parent()
            if parent is not None and parent.name() == "postgres":
                postmaster = parent
    finally:
        await conn.close()
    return postmaster, f"PostgreSQL {version}, fsync={fsync} synchronous_commit={sync_commit}"


async def _backends_gone(dsn: str, deadline: float) -> None:
    """Wait until the rebuild's server processes have exited (and their CPU was accounted)."""
    conn = await asyncpg.connect(dsn)
    try:
        while time.monotonic() < deadline:
            others = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
            if not others:
                return
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


def measure(
    dsn: str,
    size: int,
    name: str,
    postmaster: psutil.Process | None,
    *,
    dry_run: bool,
    py_spy: Path | None = None,
) -> Run:
    """One `scimledger projections rebuild --all --quiet` subprocess, measured."""
    cmd = [str(SCIMLEDGER), "projections", "rebuild", "--all", "--quiet", "--database-url", dsn]
    if dry_run:
        cmd.append("--dry-run")
    pg0 = tree_cpu(postmaster) if postmaster is not None else None
    busy0 = machine_busy()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=errors,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        spy = _attach_py_spy(proc.pid, py_spy) if py_spy is not None else None
        sampled = 0
        marks: dict[int, int] = {}  # pid -> its VmHWM, the command's and its workers'
        try:
            watched = psutil.Process(proc.pid)
            while True:
                # wait4 reaps the child and returns its rusage: its own CPU and that of the
                # children it reaped (the CLI forks its workers and joins them).
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    seconds = time.perf_counter() - started
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    break
                with contextlib.suppress(psutil.Error):
                    tree = [watched, *watched.children(recursive=True)]
                    rss = 0
                    for member in tree:
                        with contextlib.suppress(psutil.Error):
                            rss += member.memory_info().rss
                            marks[member.pid] = max(
                                marks.get(member.pid, 0), high_water(member.pid)
                            )
                    sampled = max(sampled, rss)
                time.sleep(0.05)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        finally:
            if spy is not None:
                spy.wait(timeout=60)
        peak = sum(marks.values())
        out.seek(0)
        text = out.read().decode(errors="replace")
        errors.seek(0)
        problems = errors.read().decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(cmd[:5])} exited with {proc.returncode}:\n{text}\n{problems}".strip()
        )
    busy = machine_busy() - busy0
    cpu = usage.ru_utime + usage.ru_stime
    pg = other = None
    if postmaster is not None and pg0 is not None:
        asyncio.run(_backends_gone(dsn, time.monotonic() + 10))
        pg = tree_cpu(postmaster) - pg0
        other = max(0.0, busy - cpu - pg)
    projections: dict[str, tuple[int, float, float]] = {}
    diffs: dict[str, tuple[int, int, int]] = {}
    for line in text.splitlines():
        if m := REPORT.match(line):
            projections[m[1]] = (int(m[2]), float(m[3]), float(m[4].replace(",", "")))
        elif m := DIFF.match(line):
            diffs[m[1]] = (int(m[2]), int(m[3]), int(m[4]))
    if set(projections) != set(PROJECTIONS):
        raise BenchError(f"expected a report line per projection, got:\n{text}")
    wrong = {k: n for k, (n, _, _) in projections.items() if n != size}
    if wrong:
        raise BenchError(f"projections replayed {wrong} events, the store holds {size:,}")
    return Run(
        size,
        name,
        seconds,
        max(peak, sampled),
        sampled,
        cpu,
        other,
        pg,
        projections,
        diffs,
        text,
    )


def _attach_py_spy(pid: int, directory: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
    if not Path(exe).exists():
        err.print("[yellow]py-spy not found; profiling skipped")
        return None
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"rebuild-{pid}.speedscope.json"
    err.print(f"profiling pid {pid} with py-spy into {target}")
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--format", "speedscope", "--output", str(target)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Args:
    sizes: list[int]
    tenant_events: int
    writers: int
    chunk: int
    py_spy: Path | None
    argv: str


@dataclass
class Outcome:
    runs: list[Run]
    seeded: list[tuple[int, float, int, float]]  # events, seconds seeding, tenants, catch-up s
    topics: dict[str, int]
    settings: str
    revision: str


async def _prepare(dsn: str) -> asyncpg.Pool:
    pool = await create_pool(dsn, min_size=1, max_size=8)
    async with pool.acquire() as conn:
        await migrate(conn)
        existing = int(await conn.fetchval("SELECT count(*) FROM stored_events"))
    if existing:
        await pool.close()
        raise BenchError(
            f"the database already holds {existing:,} events; the benchmark needs an empty one"
        )
    return pool


def bench(args: Args, dsn: str, rev: str) -> Outcome:
    import uvloop

    runs: list[Run] = []
    seeded = Seeded()
    marks: list[tuple[int, float, int, float]] = []
    caught_up = 0.0
    postmaster, settings = asyncio.run(postmaster_of(dsn))
    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>10}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
    ) as progress:
        for size in args.sizes:

            async def grow(size: int = size) -> None:
                pool = await _prepare(dsn) if not marks else await create_pool(dsn, max_size=8)
                try:
                    await seed(
                        pool,
                        seeded,
                        size,
                        args.tenant_events,
                        args.writers,
                        args.chunk,
                        progress,
                    )
                    # What autovacuum would have done by now; and no checkpoint due mid-run.
                    async with pool.acquire() as conn:
                        await conn.execute("VACUUM ANALYZE stored_events")
                        await conn.execute("CHECKPOINT")
                finally:
                    await pool.close()

            uvloop.run(grow())
            caught_up += uvloop.run(catch_up_async(dsn, progress))
            marks.append((seeded.events, seeded.seconds, seeded.tenants, caught_up))
            plan = [
                ("rebuild (views stale)", False),
                ("rebuild --dry-run", True),
                ("rebuild (views current)", False),
            ]
            for label, dry_run in plan:
                task = progress.add_task(f"{seeded.events:,}: {label}", total=None, rate="")
                last = size == args.sizes[-1] and label.endswith("current)")
                spy = args.py_spy if last else None
                run = measure(dsn, seeded.events, label, postmaster, dry_run=dry_run, py_spy=spy)
                progress.update(task, total=1, completed=1, rate=f"{run.rate:,.0f}/s")
                runs.append(run)
                if dry_run and run.diff_text() != "none":
                    raise BenchError(f"a dry run right after a rebuild found drift:\n{run.output}")
    return Outcome(runs, marks, seeded.topics, settings, rev)


def report(args: Args, outcome: Outcome) -> None:
    title = f"Rebuild of every projection ({', '.join(PROJECTIONS)}) as a subprocess"
    table = Table(title=title)
    for col in COLUMNS:
        left = col in ("run", "per projection events/s", "diff")
        table.add_column(col, justify="left" if left else "right")
    rows = [r.row() for r in outcome.runs]
    for row in rows:
        table.add_row(*row)

    notes = []
    asynchronous = [p.name for p in PROJECTIONS.values() if p.mode == "async"]
    inline = [p.name for p in PROJECTIONS.values() if p.mode == "inline"]
    for events, seconds, tenants, caught_up in outcome.seeded:
        notes.append(
            f"seeded {events:,} events ({tenants} tenants) in {seconds:,.0f} s of seeding"
            f" ({events / seconds:,.0f} events/s); the {', '.join(asynchronous)} runner"
            f" caught up in {caught_up:,.0f} s so far; the {' and '.join(inline)} views were"
            " written by the first rebuild"
        )
    total = sum(outcome.topics.values())
    mix = ", ".join(
        f"{name} {n / total:.1%}" for name, n in sorted(outcome.topics.items(), key=lambda x: -x[1])
    )
    notes.append(f"event mix: {mix}")
    for r in outcome.runs:
        if r.other_cpu is not None and r.other_cpu > 0.1 * r.seconds:
            notes.append(
                f"{r.size:,} events, {r.name}: other processes used {r.other_cpu:.1f} CPU s"
                f" ({r.other_cpu / r.seconds:.0%} of a core); the machine was not quiet"
            )
    steady = [r for r in outcome.runs if r.name.endswith("current)")]
    for r in steady:
        verdict = "meets" if r.rate >= TARGET else "misses"
        notes.append(
            f"{r.size:,} events, views current: {r.rate:,.0f} events/s {verdict} the"
            f" {TARGET:,} target; peak RSS {r.peak_rss / 2**20:,.0f} MB"
            f" (highest RSS sample: {r.sampled_rss / 2**20:,.0f} MB)"
        )
    if len(steady) > 1:
        a, b = steady[0], steady[-1]
        notes.append(
            f"{b.size / a.size:.0f}x the events: rate x{b.rate / a.rate:.2f},"
            f" peak RSS x{b.peak_rss / a.peak_rss:.2f}"
        )
    notes.append(
        "events/s = events x projections / wall seconds of the subprocess (start-up included);"
        " log events/s = events / the same seconds (every projection of each event);"
        " per projection: the CLI's own figure (shadow tables, replay, indexes, diff, swap)"
    )
    footer = f"{outcome.revision}; {outcome.settings}; {machine()}"
    out = Console(width=None if sys.stdout.isatty() else 180)
    out.print(table)
    for line in notes:
        out.print(line)
    out.print(footer)

    md = [
        "# bench.rebuild",
        "",
        f"{title}; `.venv/bin/python -m bench.rebuild{args.argv}`,"
        f" {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| "
        + " | ".join(
            "---" if c in ("run", "per projection events/s", "diff") else "---:" for c in COLUMNS
        )
        + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        *(f"- {line}" for line in notes),
        f"- {footer}",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(md))
    out.print(f"written to {RESULTS.relative_to(ROOT)}")


def run(args: Args) -> int:
    with contextlib.ExitStack() as stack:
        stack.callback(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT))
        err.print("starting a durable embedded PostgreSQL …")
        dsn = stack.enter_context(durable_postgres())
        rev = revision()
        try:
            outcome = bench(args, dsn, rev)
        except BenchError as e:
            err.print(f"[red]benchmark failed:[/red] {e}", markup=True, highlight=False)
            return 1
        finally:
            # A second Ctrl-C must not interrupt stopping PostgreSQL.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    report(args, outcome)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1_000_000, help="largest size")
    parser.add_argument("--quick", action="store_true", help=f"only {SMALL:,} events")
    parser.add_argument(
        "--tenant-events", type=int, default=50_000, help="events of one tenant's history"
    )
    parser.add_argument("--writers", type=int, default=2, help="seeding connections")
    parser.add_argument("--chunk", type=int, default=5000, help="events per seeding transaction")
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="DIR",
        help="profile the last steady-state rebuild with py-spy, speedscope JSON into DIR",
    )
    ns = parser.parse_args(argv)
    if min(ns.events, ns.tenant_events, ns.writers, ns.chunk) < 1:
        parser.error("counts must be positive")
    sizes = [SMALL] if ns.quick else sorted({min(SMALL, ns.events), ns.events})
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    args = Args(sizes, ns.tenant_events, ns.writers, ns.chunk, ns.py_spy, f" {shown}" * bool(shown))
    try:
        return run(args)
    except KeyboardInterrupt:
        err.print("interrupted; PostgreSQL stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
