"""What one hostile request costs: the worst bodies up to 2 MiB, and another tenant meanwhile.

    .venv/bin/python -m bench.cost [--samples N] [--seconds S] [--code DIR]

One `scimledger serve` process on a durable PostgreSQL, two tenants. For each shape (many
values, long strings, deep nesting, many PATCH operations on one multi-valued attribute, many
members), one request at a time: the server process's CPU seconds for it, read from /proc
(psutil) before and after, and its wall time; the most of `--samples` tries. Then the other
tenant's GET /Users/{id}, one at a time for `--seconds`: its p99 alone, and again while the
hostile tenant sends the shapes back to back. Target: every shape within 1 s of server CPU.
`--code DIR` runs the server from another checkout (PYTHONPATH), e.g. the main branch, to
measure before and after. Written to bench/results/cost-latest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
import psutil

from bench.common import ROOT, percentile, revision
from bench.users import (
    Served,
    create_tenant,
    err,
    free_port,
    process_cpu,
    served,
    server_process,
    wait_ready,
)

LIMIT = 2 * 1024 * 1024 - 4096  # bodies just under the default SCIMLEDGER_MAX_BODY_BYTES
TARGET_CPU = 1.0  # server CPU seconds per request
TIMEOUT = 120.0  # a request that takes longer is reported as not answered
RESULTS = ROOT / "bench" / "results" / "cost-latest.md"
USER = "urn:ietf:params:scim:schemas:core:2.0:User"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def _fill(make: Callable[[int], object], per_item: int) -> list[object]:
    """As many items as fit in LIMIT (per_item: the bytes of one, comma included)."""
    return [make(i) for i in range(LIMIT // per_item)]


def _user(user_name: str, **attributes: object) -> bytes:
    return orjson.dumps({"schemas": [USER], "userName": user_name, **attributes})


def _patch(operations: list[object]) -> bytes:
    return orjson.dumps({"schemas": [PATCH_OP], "Operations": operations})


def _email(i: int) -> dict[str, str]:
    return {"type": "work", "value": f"user{i:06d}@contoso.com"}


@dataclass
class Targets:
    """Resources the shapes aim at: a user holding 1000 emails, three users, a group."""

    full_user: str = ""
    members: list[str] = field(default_factory=list)
    group: str = ""


@dataclass
class Shape:
    name: str
    method: str
    path: Callable[[Targets], str]
    body: Callable[[Targets], bytes]


def _nested(depth: int) -> bytes:
    """2 MiB of lists nested `depth` deep (orjson parses up to 1024 levels)."""
    one = b"[" * depth + b'"x"' + b"]" * depth
    return b"[" + b",".join([one] * (LIMIT // (len(one) + 1))) + b"]"


SHAPES: list[Shape] = [
    Shape(
        "POST /Users, 20,000 distinct emails (the issue's case)",
        "POST",
        lambda t: "/Users",
        lambda t: _user(
            f"e20k-{uuid.uuid4().hex}", emails=[{"value": f"{i}@x.io"} for i in range(20_000)]
        ),
    ),
    Shape(
        "POST /Users, distinct emails filling 2 MiB",
        "POST",
        lambda t: "/Users",
        lambda t: _user(f"e2m-{uuid.uuid4().hex}", emails=_fill(_email, 49)),
    ),
    Shape(
        "POST /Users, 1000 emails (the cap) of 2 KB each",
        "POST",
        lambda t: "/Users",
        lambda t: _user(
            f"cap-{uuid.uuid4().hex}",
            emails=[{"value": f"{i}-" + "a" * 2000} for i in range(1000)],
        ),
    ),
    Shape(
        "POST /Users, one string of 2 MiB",
        "POST",
        lambda t: "/Users",
        lambda t: _user(f"long-{uuid.uuid4().hex}", displayName="x" * LIMIT),
    ),
    Shape(
        "POST /Users, 2 MiB of lists nested 1000 deep",
        "POST",
        lambda t: "/Users",
        lambda t: _user(f"deep-{uuid.uuid4().hex}")[:-1] + b',"roles":' + _nested(1000) + b"}",
    ),
    Shape(
        "POST /Users, 2 MiB of one-character member names",
        "POST",
        lambda t: "/Users",
        lambda t: _user(
            f"keys-{uuid.uuid4().hex}", name={f"k{i}": "v" for i in range(LIMIT // 16)}
        ),
    ),
    Shape(
        "PATCH /Users, 1000 filtered operations on a user of 1000 emails",
        "PATCH",
        lambda t: f"/Users/{t.full_user}",
        lambda t: _patch(
            [
                {
                    "op": "replace",
                    "path": f'emails[value eq "user{i:06d}@contoso.com"].display',
                    "value": f"d{uuid.uuid4().hex[:6]}",
                }
                for i in range(1000)
            ]
        ),
    ),
    Shape(
        "PATCH /Users, Entra-style remove listing 1000 values, on 1000 emails",
        "PATCH",
        lambda t: f"/Users/{t.full_user}",
        lambda t: _patch(
            [
                {
                    "op": "remove",
                    "path": "emails",
                    "value": [
                        {"value": f"USER{i:06d}@contoso.com", "type": "x"} for i in range(1000)
                    ],
                }
            ]
        ),
    ),
    Shape(
        "PATCH /Users, 1000 operations adding emails, 2 MiB",
        "PATCH",
        lambda t: f"/Users/{t.full_user}",
        lambda t: _patch(
            [
                {
                    "op": "add",
                    "path": "emails",
                    "value": [_email(1000 + i * 40 + j) for j in range(40)],
                }
                for i in range(1000)
            ]
        ),
    ),
    Shape(
        "PATCH /Users, 1000 removes with 1 KB value filters (40 terms), on 1000 emails",
        "PATCH",
        lambda t: f"/Users/{t.full_user}",
        lambda t: _patch(
            [
                {
                    "op": "remove",
                    "path": "emails["
                    + " or ".join(f'value eq "{i}-{j}"' for j in range(40))
                    + "].display",
                }
                for i in range(1000)
            ]
        ),
    ),
    Shape(
        "POST /Groups, 10,000 members (the cap; 3 users, repeated)",
        "POST",
        lambda t: "/Groups",
        lambda t: orjson.dumps(
            {
                "displayName": f"g-{uuid.uuid4().hex}",
                "members": [{"value": t.members[i % 3]} for i in range(10_000)],
            }
        ),
    ),
    Shape(
        "POST /Groups, 2 MiB of members (3 users, repeated)",
        "POST",
        lambda t: "/Groups",
        lambda t: orjson.dumps(
            {
                "displayName": f"g-{uuid.uuid4().hex}",
                "members": _fill(lambda i: {"value": t.members[i % 3]}, 50),
            }
        ),
    ),
    Shape(
        "POST /Groups, 2 MiB of members (distinct ids, none exists)",
        "POST",
        lambda t: "/Groups",
        lambda t: orjson.dumps(
            {
                "displayName": f"g-{uuid.uuid4().hex}",
                "members": _fill(lambda i: {"value": str(uuid.uuid4())}, 50),
            }
        ),
    ),
    Shape(
        "PATCH /Groups, 1000 operations of 40 members (2 MiB)",
        "PATCH",
        lambda t: f"/Groups/{t.group}",
        lambda t: _patch(
            [
                {
                    "op": "add" if i % 2 else "remove",
                    "path": "members",
                    "value": [{"value": t.members[j % 3]} for j in range(40)],
                }
                for i in range(1000)
            ]
        ),
    ),
]


@dataclass
class Measured:
    shape: str
    size: int
    status: str
    cpu: float  # server CPU seconds, the most of the samples
    wall: float


@dataclass
class Outcome:
    measured: list[Measured]
    alone: list[float]
    loaded: list[float]
    hostile_sent: int

    @property
    def worst(self) -> Measured:
        return max(self.measured, key=lambda m: m.cpu)

    @property
    def met(self) -> bool:
        return all(m.cpu <= TARGET_CPU and m.status != "no answer" for m in self.measured)


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        self.session, self.base = session, base
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"}

    async def send(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        async with self.session.request(
            method, self.base + path, data=body, headers=self.headers
        ) as r:
            return r.status, await r.read()


async def _targets(hostile: Client) -> Targets:
    t = Targets()
    status, raw = await hostile.send(
        "POST", "/Users", _user("full@contoso.com", emails=[_email(i) for i in range(1000)])
    )
    if status != 201:
        raise RuntimeError(f"seeding the user of 1000 emails: {status} {raw[:200]!r}")
    t.full_user = orjson.loads(raw)["id"]
    for i in range(3):
        status, raw = await hostile.send("POST", "/Users", _user(f"member{i}@contoso.com"))
        t.members.append(orjson.loads(raw)["id"])
    status, raw = await hostile.send("POST", "/Groups", orjson.dumps({"displayName": "Target"}))
    t.group = orjson.loads(raw)["id"]
    return t


def _serving_cpu(server: psutil.Process) -> float:
    """The server's CPU and its bulk process's (service/bulk.py), which serves large bodies."""
    total = process_cpu(server)
    for child in server.children():
        try:
            total += process_cpu(child)
        except psutil.Error:
            continue
    return total


async def _one(hostile: Client, shape: Shape, t: Targets, server: psutil.Process) -> Measured:
    body = shape.body(t)
    cpu_before, started = _serving_cpu(server), time.perf_counter()
    try:
        status, raw = await asyncio.wait_for(
            hostile.send(shape.method, shape.path(t), body), TIMEOUT
        )
        shown = str(status)
        if status >= 400:
            shown += " " + str(orjson.loads(raw).get("scimType") or "")
    except (TimeoutError, aiohttp.ClientError):
        shown = "no answer"
    wall = time.perf_counter() - started
    return Measured(shape.name, len(body), shown.strip(), _serving_cpu(server) - cpu_before, wall)


async def _gets(victim: Client, user: str, seconds: float) -> list[float]:
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        status, _ = await victim.send("GET", f"/Users/{user}")
        if status != 200:
            raise RuntimeError(f"the other tenant's GET answered {status}")
        samples.append(time.perf_counter() - started)
    return samples


async def _victim(origin: str, token: str, user: str, seconds: float) -> list[float]:
    """The other tenant's GETs, timed in a process of their own: building 2 MiB bodies here
    would stall this event loop and count as the server's latency."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.cost",
        "--victim",
        orjson.dumps([origin, token, user, seconds]).decode(),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the other tenant's GETs failed ({proc.returncode})")
    samples: list[float] = orjson.loads(out)
    return samples


async def _victim_main(origin: str, token: str, user: str, seconds: float) -> None:
    async with aiohttp.ClientSession() as session:
        samples = await _gets(Client(session, f"{origin}/scim/v2", token), user, seconds)
    sys.stdout.write(orjson.dumps(samples).decode())


async def run(
    s: Served, origin: str, victim_token: str, samples: int, seconds: float, shapes: list[Shape]
) -> Outcome:
    server = psutil.Process(s.proc.pid)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT + 60)
    async with aiohttp.ClientSession(timeout=timeout) as hs, aiohttp.ClientSession() as vs:
        await wait_ready(hs, origin, s.proc, s.log)
        hostile = Client(hs, f"{origin}/scim/v2", s.token)
        victim = Client(vs, f"{origin}/scim/v2", victim_token)
        t = await _targets(hostile)
        _, raw = await victim.send("POST", "/Users", _user("victim@contoso.com"))
        victim_user = orjson.loads(raw)["id"]
        measured = []
        for shape in shapes:
            tries = [await _one(hostile, shape, t, server) for _ in range(samples)]
            worst = max(tries, key=lambda m: m.cpu)
            err.print(
                f"{shape.name}: {worst.status}, {worst.size / 1024:,.0f} KiB,"
                f" server CPU {worst.cpu:.3f} s, wall {worst.wall:.3f} s"
            )
            measured.append(worst)
        if seconds <= 0:
            return Outcome(measured, [], [], 0)
        alone = await _victim(origin, victim_token, victim_user, seconds)
        sent = 0
        stop = asyncio.Event()

        async def hostile_load() -> None:
            nonlocal sent
            while not stop.is_set():
                for shape in shapes:
                    if stop.is_set():
                        return
                    await _one(hostile, shape, t, server)
                    sent += 1

        load = asyncio.create_task(hostile_load())
        try:
            loaded = await _victim(origin, victim_token, victim_user, seconds)
        finally:
            stop.set()
            await load
    return Outcome(measured, alone, loaded, sent)


def measure(dsn: str, samples: int, seconds: float, log: Path) -> Outcome:
    """For bench.suite: a server of its own on `dsn` (a database of its own), every shape."""
    import uvloop

    port = free_port()
    token, victim = create_tenant(dsn), create_tenant(dsn)
    with server_process(dsn, port, log) as proc:
        s = Served(dsn, token, proc, log, revision())
        return uvloop.run(run(s, f"http://127.0.0.1:{port}", victim, samples, seconds, SHAPES))


def report(outcome: Outcome, rev: str, shown: str) -> str:
    lines = [
        "# bench.cost",
        "",
        f"`.venv/bin/python -m bench.cost{shown}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {rev}.",
        "",
        "| request | body | status | server CPU s | wall s |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for m in outcome.measured:
        lines.append(
            f"| {m.shape} | {m.size / 1024:,.0f} KiB | {m.status} | {m.cpu:.3f} | {m.wall:.3f} |"
        )
    lines += [
        "",
        f"- the most server CPU for one request: {outcome.worst.cpu:.3f} s ({outcome.worst.shape});"
        f" target ≤ {TARGET_CPU:.0f} s: {'met' if outcome.met else 'MISSED'}",
        f"- the other tenant's GET /Users/{{id}}, one at a time: p99 {p99(outcome.alone)} alone"
        f" ({len(outcome.alone):,} requests), p99 {p99(outcome.loaded)} while the hostile tenant"
        f" sent {outcome.hostile_sent} of these requests back to back ({len(outcome.loaded):,})",
        "",
    ]
    return "\n".join(lines)


def p99(samples: list[float]) -> str:
    return f"{percentile(samples, 99) * 1000:.1f} ms" if samples else "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=2, help="tries per shape (the most counts)")
    parser.add_argument("--seconds", type=float, default=20, help="each GET p99 phase")
    parser.add_argument("--code", type=Path, help="run the server from this checkout instead")
    parser.add_argument("--only", default="", help="only the shapes whose name contains this")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default {RESULTS.name}")
    parser.add_argument("--victim", help=argparse.SUPPRESS)  # [origin, token, user, seconds]
    ns = parser.parse_args(argv)
    if ns.victim:
        asyncio.run(_victim_main(*orjson.loads(ns.victim)))
        return 0
    shapes = [shape for shape in SHAPES if ns.only in shape.name]
    if not shapes:
        parser.error(f"no shape's name contains {ns.only!r}")
    if ns.code is not None:
        os.environ["PYTHONPATH"] = str(ns.code.resolve())
    shown = f" --samples {ns.samples} --seconds {ns.seconds:g}"
    shown += f" --code {ns.code}" if ns.code else ""
    shown += f" --only '{ns.only}'" if ns.only else ""
    port = free_port()
    import uvloop

    with served(port, "bench-cost-") as s:
        victim = create_tenant(s.dsn)
        origin = f"http://127.0.0.1:{port}"
        outcome = uvloop.run(run(s, origin, victim, ns.samples, ns.seconds, shapes))
        rev = s.revision if ns.code is None else f"code from {ns.code}"
    text = report(outcome, rev, shown)
    print(text)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(text)
    err.print(f"written to {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
