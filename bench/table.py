"""The benchmark's table: its rows, the sizes they run at, what the rows share in a run, and
how its cells write figures."""

from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.common import Meter, Scim, err

COLUMNS = ("#", "measurement", "size", "scimledger", "scim2-server (peer)", "target", "verdict",
    "CPU in cores: client / server / postgres / other")  # fmt: skip
CONCURRENCY = 16
median = statistics.median


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    return ordered[round(pct / 100 * (len(ordered) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def verdict(ok: bool | None) -> str:
    return "inconclusive" if ok is None else ("met" if ok else "MISSED")


@dataclass(frozen=True)
class Sizes:
    post_seconds: float
    floor_rows: int
    users: tuple[int, int, int]
    get_seconds: float
    groups: tuple[int, int, int]
    pairs: int
    cycle: tuple[int, int, int]  # users, groups, memberships
    rebuild_events: int
    audit_entries: int
    audit_samples: int
    peer_seed_timeout: float  # seconds of POSTs allowed to grow the peer's store per size
    peer_group_timeout: float  # seconds allowed to grow one of the peer's groups
    # tries per shape; seconds of the other tenant's GETs beside bodies every other second; and
    # of each comparison (bench/cost.py)
    cost: tuple[int, float, float]
    extensions: tuple[int, int]  # rounds, users per tenant and round
    feeds: tuple[int, int, int]  # events caught up on, POSTs per writes round, rounds
    rebuild_runs: int = 1  # runs with the views current; the row is the median's
    rebuild_sealed: bool = True  # the ledger sealed, unless the code under test predates sealing

    def with_set(self, assignments: Sequence[str]) -> Sizes:
        """These sizes with `--set NAME=VALUE`s: VALUE a number (0 or 1 for a flag), or numbers
        comma-separated for a tuple; ValueError for a NAME or VALUE that does not fit."""
        changed: dict[str, Any] = {}
        for name, _, value in (assignment.partition("=") for assignment in assignments):
            if name not in (names := [f.name for f in fields(self)]):
                raise ValueError(f"{name!r} is none of {', '.join(names)}")
            now = getattr(self, name)
            was = now if isinstance(now, tuple) else (now,)
            new = [type(x)(v) for x, v in zip(was, json.loads(f"[{value}]"), strict=True)]
            changed[name] = tuple(new) if isinstance(now, tuple) else new[0]
        return replace(self, **changed)


# The peer slows down as it grows (each POST and each member add scans what it holds): its
# sizes are reached within peer_seed_timeout and peer_group_timeout, or measured where it got to.
FULL = Sizes(post_seconds=30, floor_rows=40_000, users=(10_000, 100_000, 1_000_000),
    get_seconds=20, groups=(10, 10_000, 100_000), pairs=500, cycle=(10_000, 100, 50_000),
    rebuild_events=1_000_000, audit_entries=1_000_000, audit_samples=100,
    peer_seed_timeout=180, peer_group_timeout=120, cost=(3, 120.0, 20.0),
    extensions=(10, 500), feeds=(200_000, 2000, 3))  # fmt: skip
QUICK = Sizes(post_seconds=10, floor_rows=8_000, users=(1_000, 10_000, 50_000),
    get_seconds=8, groups=(10, 1_000, 10_000), pairs=150, cycle=(1_000, 20, 5_000),
    rebuild_events=100_000, audit_entries=100_000, audit_samples=30,
    peer_seed_timeout=60, peer_group_timeout=60, cost=(1, 60.0, 5.0),
    extensions=(4, 200), feeds=(20_000, 300, 1))  # fmt: skip


@dataclass
class Row:
    item: str
    what: str
    size: str
    ours: str
    peer: str = ""
    target: str = ""
    verdict: str = ""
    cpu: str = ""


@dataclass
class Server:
    """A server under measurement: where it answers, its token, its process and CPU meter."""

    origin: str
    base: str
    token: str
    proc: subprocess.Popen[bytes]
    meter: Meter
    profile: Path | None = None  # py-spy records it during the measured wrk runs, into here

    def scim(self, session: aiohttp.ClientSession) -> Scim:
        return Scim(session, self.base, self.token)


@dataclass
class Ctx:
    """One run: its sizes, the table so far, and what the rows over HTTP share."""

    sizes: Sizes
    quick: bool
    dsn: str
    skip: frozenset[str] = frozenset()
    profile: Path | None = None  # where py-spy's profiles of our server go
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pg_version: str = ""
    postmaster: psutil.Process | None = None
    # While the servers run (the rows over HTTP):
    session: aiohttp.ClientSession | None = None
    ours: Server | None = None
    peer: Server | None = None
    ids: dict[int, str] = field(default_factory=dict)  # user i -> its id (the group members)
    peer_ids: dict[int, str] = field(default_factory=dict)  # the same on the peer
    stored: int = 0  # users seeded so far (NAME_FORMAT % i for i below)

    @property
    def no_peer(self) -> str:
        return "skipped" if "peer" in self.skip else "not installed"

    def http(self) -> tuple[aiohttp.ClientSession, Server]:
        assert self.session is not None and self.ours is not None, "a row over HTTP"
        return self.session, self.ours

    def add(self, row: Row) -> None:
        self.rows.append(row)
        err.print(f"({row.item}) {row.what}, {row.size}: {row.ours} | peer: {row.peer or '-'}")


def render_markdown(title: str, rows: Sequence[Row], notes: Sequence[str], machine: str) -> str:
    escaped = ([text.replace("|", "\\|") for text in astuple(r)] for r in rows)
    table = [COLUMNS, ["---"] * len(COLUMNS), *escaped]
    lines = [f"# {title}", "", *("| " + " | ".join(cells) + " |" for cells in table), ""]
    lines += ["## Machine", "", machine, "", "## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)
