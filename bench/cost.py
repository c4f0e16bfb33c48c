"""Row (9): what one hostile request costs: each body shape up to 2 MiB, one at a time, its
server CPU (from /proc, before and after); another tenant's GET p99 while those bodies run,
and while none does.

The method, and why:
- The other tenant times its GETs, one after another, in a process of its own and a session
  of its own (Linux's autogroup schedules each session as one entity: in the benchmark's
  session it would compete with the benchmark itself for its share of a core), throughout.
- The hostile tenant is a process of its own too, which builds its bodies before it starts
  (building one costs up to 0.1 s of CPU) and then sends them back to back for ALTERNATE
  seconds, rests as long, and so on, noting when each body was in flight. Each of the other
  tenant's GETs counts as "while it runs" if a body was in flight during it, as "with none"
  if none was within AFTER seconds before it or QUIET seconds after it, as "just after one"
  in between; and with no hostile tenant at all, for a separate while, for comparison.
  Alternating second by second, a burst of other work on
  a shared machine lands on both sides rather than on one (5 s phases, one side then the
  other, put the same configuration's ratio anywhere from 1.3 to 1.9).
- Then all of it again with the other tenant's GETs PACE a second, each timed from when it
  was due, as a tenant's sync sends them: one after another, they find the server's
  processes awake, and on 2 cores a paced GET's p99 came out 1.7-2.4 times alone where the
  other way's was 1.1-2.3 (four runs, docs/operations.md). The verdict wants both.
- The hostile process runs on the CPUs the server confines its bulk process to (by default
  the last quarter, service/limits_cpu.py), whatever the server's own setting: an attacker's
  client runs on the attacker's machine, and on one machine of 2 cores its sending (with
  loopback, also the kernel's delivery of what it sends) on the CPU left to everyone else put
  the other tenant's p99 at 2.7-4.1 times alone for one 2 MiB string back to back, against
  1.1-1.3 times with the sender on the bulk CPU (two runs each, interleaved, one 2 MiB shape).
- And the paced run once more with the same bodies sent to a second scimledger, on a database
  of its own in the same PostgreSQL, it and its bulk process (with their PostgreSQL backends)
  confined to the bulk CPUs: the best isolation one machine allows, so what the other tenant
  still loses there is the machine's (shared caches, memory, the hypervisor, the database
  cluster's WAL and buffers), not the server's routing. On 2 cores it lost as much as beside
  the server's own bulk process: 1.4-2.2 times, against 1.3-2.1 (three runs each,
  interleaved, 2026-12-07).
- Then, for comparison, as many plain GETs a second from the hostile tenant (from its process
  on the same CPUs, each on a new connection, as each hostile body is) beside a CPU-bound loop
  in a session of its own, and the loop alone: on a machine of 2 cores that loop is the floor
  any competing work sets."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import aiohttp
import orjson
import psutil

from bench.common import (
    CHILD,
    BenchError,
    Scim,
    create_tenant,
    err,
    finished,
    make_database,
    patch_body,
    scimledger,
    serving,
    tree_cpu,
)
from bench.table import Ctx, Row, ms, percentile, verdict
from service.limits_cpu import bulk_cpu_set, cpu_list

LIMIT = 2 * 1024 * 1024 - 4096  # bodies just under the default SCIMLEDGER_MAX_BODY_BYTES
TARGET_CPU = 1.0  # server CPU seconds per request
TIMEOUT = 120.0  # a request that takes longer is reported as not answered
# The other tenant keeps its p99 while the hostile bodies run: at most this many times its p99
# while none does.
TARGET_P99_RATIO = 1.5
# The hostile tenant sends for this many seconds, rests as long, and again.
ALTERNATE = 1.0
# A GET counts as alone when no body was in flight within AFTER seconds before it (what the
# server does after a body, its projections say, and the kernel's and PostgreSQL's writing of
# it, may still take a CPU) nor QUIET seconds after it.
AFTER, QUIET = 0.5, 0.05
# The other tenant's GETs a second in the second run, as a tenant's sync sends them: each on
# its own, where one after another they find the server's processes awake.
PACE = 200.0
# Stands for the unique part of a name in a prebuilt body; replaced by a fresh one (same length)
# each time the body is sent.
FRESH = b"fresh-name-placeholder-012345678"  # 32 bytes, as a uuid's hex
USER = "urn:ietf:params:scim:schemas:core:2.0:User"


def _fill(make: Callable[[int], object], per_item: int) -> list[object]:
    """As many items as fit in LIMIT (per_item: the bytes of one, comma included)."""
    return [make(i) for i in range(LIMIT // per_item)]


def _user(user_name: str, **attributes: object) -> bytes:
    return orjson.dumps({"schemas": [USER], "userName": user_name, **attributes})


def _email(i: int) -> dict[str, str]:
    return {"type": "work", "value": f"user{i:06d}@contoso.com"}


@dataclass
class Targets:
    """Resources the shapes aim at: a user holding 1000 emails, three users, a group."""

    full_user: str
    members: list[str]
    group: str


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


def _unique(kind: str) -> str:
    return f"{kind}-{FRESH.decode()}"


def _members(t: Targets, n: int) -> list[object]:
    return [{"value": t.members[j % 3]} for j in range(n)]


def _op(op: str, path: str, value: object = None) -> dict[str, object]:
    return {"op": op, "path": path} | ({} if value is None else {"value": value})


def _group(members: list[object]) -> bytes:
    return orjson.dumps({"displayName": _unique("g"), "members": members})


USERS, FULL = (lambda t: "/Users"), (lambda t: f"/Users/{t.full_user}")
GROUPS, GROUP = (lambda t: "/Groups"), (lambda t: f"/Groups/{t.group}")
R = range(1000)
SHAPES: list[Shape] = [
    Shape("POST /Users, 20,000 distinct emails (the issue's case)", "POST", USERS,
          lambda t: _user(_unique("e20k"), emails=[{"value": f"{i}@x.io"} for i in range(20_000)])),
    Shape("POST /Users, distinct emails filling 2 MiB", "POST", USERS,
          lambda t: _user(_unique("e2m"), emails=_fill(_email, 49))),
    Shape("POST /Users, 1000 emails (the cap) of 2 KB each", "POST", USERS,
          lambda t: _user(_unique("cap"), emails=[{"value": f"{i}-" + "a" * 2000} for i in R])),
    Shape("POST /Users, one string of 2 MiB", "POST", USERS,
          lambda t: _user(_unique("long"), displayName="x" * LIMIT)),
    Shape("POST /Users, 2 MiB of lists nested 1000 deep", "POST", USERS,
          lambda t: _user(_unique("deep"))[:-1] + b',"roles":' + _nested(1000) + b"}"),
    Shape("POST /Users, 2 MiB of one-character member names", "POST", USERS,
          lambda t: _user(_unique("keys"), name={f"k{i}": "v" for i in range(LIMIT // 16)})),
    Shape("PATCH /Users, 1000 filtered operations on a user of 1000 emails", "PATCH", FULL,
          lambda t: patch_body([_op("replace", f'emails[value eq "{_email(i)["value"]}"].display',
                                    f"d{uuid.uuid4().hex[:6]}") for i in R])),
    Shape("PATCH /Users, Entra-style remove listing 1000 values, on 1000 emails", "PATCH", FULL,
          lambda t: patch_body([_op("remove", "emails", [
              {"value": f"USER{i:06d}@contoso.com", "type": "x"} for i in R])])),
    Shape("PATCH /Users, 1000 operations adding emails, 2 MiB", "PATCH", FULL,
          lambda t: patch_body([_op("add", "emails", [_email(1000 + i * 40 + j) for j in range(40)])
                                for i in R])),
    Shape("PATCH /Users, 1000 removes with 1 KB value filters (40 terms), on 1000 emails",
          "PATCH", FULL, lambda t: patch_body([_op("remove", "emails[" + " or ".join(
              f'value eq "{i}-{j}"' for j in range(40)) + "].display") for i in R])),
    Shape("POST /Groups, 10,000 members (the cap; 3 users, repeated)", "POST", GROUPS,
          lambda t: _group(_members(t, 10_000))),
    Shape("POST /Groups, 2 MiB of members (3 users, repeated)", "POST", GROUPS,
          lambda t: _group(_members(t, LIMIT // 50))),
    Shape("POST /Groups, 2 MiB of members (distinct ids, none exists)", "POST", GROUPS,
          lambda t: _group(_fill(lambda i: {"value": str(uuid.uuid4())}, 50))),
    Shape("PATCH /Groups, 1000 operations of 40 members (2 MiB)", "PATCH", GROUP,
          lambda t: patch_body([_op("add" if i % 2 else "remove", "members", _members(t, 40))
                                for i in R])),
]  # fmt: skip
if os.environ.get("BENCH_COST_SHAPES"):  # e.g. "7,13": those shapes only, to see one's effect
    SHAPES = [SHAPES[int(i)] for i in os.environ["BENCH_COST_SHAPES"].split(",")]


@dataclass
class Measured:
    shape: str
    size: int
    status: str
    cpu: float  # server CPU seconds, the most of the samples
    wall: float


async def _targets(hostile: Scim) -> Targets:
    full = await hostile.create("Users", _user("full@contoso.com", emails=[*map(_email, R)]))
    members = [await hostile.create("Users", _user(f"member{i}@contoso.com")) for i in range(3)]
    return Targets(full, members, await hostile.create("Groups", b'{"displayName": "Target"}'))


async def _send(hostile: Scim, shape: Shape, body: bytes, t: Targets) -> str:
    """The shape once, with a fresh name; the reply's status and scimType, or "no answer"."""
    try:
        fresh = body.replace(FRESH, uuid.uuid4().hex.encode())
        request = hostile.request(shape.method, shape.path(t), fresh)
        status, raw = await asyncio.wait_for(request, TIMEOUT)
    except (TimeoutError, aiohttp.ClientError):
        return "no answer"
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
        return f"{status} {orjson.loads(raw).get('scimType') or ''}".strip()
    return str(status)


async def _one(
    hostile: Scim, shape: Shape, body: bytes, t: Targets, server: psutil.Process
) -> Measured:
    # The server's CPU and its bulk process's (service/bulk.py), which serves large bodies.
    cpu_before, started = tree_cpu(server), time.perf_counter()
    shown = await _send(hostile, shape, body, t)
    wall = time.perf_counter() - started
    return Measured(shape.name, len(body), shown, tree_cpu(server) - cpu_before, wall)


Span = tuple[float, float]  # when a request started and ended (time.monotonic, any process)


async def _alternating(
    hostile: Scim, bodies: list[bytes], t: Targets, seconds: float
) -> list[Span]:
    """The shapes back to back, one at a time, for ALTERNATE seconds, then a rest as long, and
    again, for `seconds` (a body under way is finished); when each body was in flight."""
    spans: list[Span] = []
    end, turn = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        await asyncio.sleep(ALTERNATE)
        sending = min(time.monotonic() + ALTERNATE, end)
        while time.monotonic() < sending:
            i, turn = turn % len(SHAPES), turn + 1
            started = time.monotonic()
            await _send(hostile, SHAPES[i], bodies[i], t)
            spans.append((started, time.monotonic()))
    return spans


async def _hostile(
    origin: str, token: str, targets: dict[str, Any], cpus: list[int], mode: str,
    seconds: float, rate: float,
) -> list[Span]:  # fmt: skip
    """The hostile tenant's process (see cost): on `cpus` (all, if none), its bodies built,
    says it is ready and starts when told (a line on stdin); `mode` "bodies" or "plain"."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    t = Targets(**targets)
    bodies = [shape.body(t) for shape in SHAPES] if mode == "bodies" else []
    timeout = aiohttp.ClientTimeout(total=TIMEOUT + 60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        hostile = Scim(session, f"{origin}/scim/v2", token)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        if mode == "bodies":
            return await _alternating(hostile, bodies, t, seconds)
        # Plain GETs of one of its users, each on a connection of its own (as each hostile
        # body is: the bulk process's reply closes it).
        return await _gets(origin, token, t.members[0], seconds, rate, fresh=True)


async def _gets(
    origin: str, token: str, user: str, seconds: float, rate: float = 0.0, fresh: bool = False
) -> list[Span]:
    """GETs of `user` for `seconds`: one after another, or `rate` a second (each timed from
    when it was due, so that a wait to send it counts); each on a new connection if `fresh`."""
    samples: list[Span] = []
    connector = aiohttp.TCPConnector(force_close=fresh)
    async with aiohttp.ClientSession(connector=connector) as session:
        victim = Scim(session, f"{origin}/scim/v2", token)
        began = time.monotonic()
        while (started := time.monotonic()) < began + seconds:
            due = began + len(samples) / rate if rate else started
            await victim.send("GET", f"/Users/{user}")
            samples.append((due, time.monotonic()))
            if rate:
                await asyncio.sleep(max(began + len(samples) / rate - time.monotonic(), 0))
    return samples


def _classes(gets: list[Span], bodies: list[Span]) -> dict[str, list[float]]:
    """The GETs' durations by what the hostile tenant was doing: "during" a body in flight,
    "after" one (within AFTER seconds of its end), "alone" (no body within AFTER seconds before
    the GET nor QUIET seconds after it); `bodies` one after another, in order."""
    starts = [started for started, _ in bodies]
    found: dict[str, list[float]] = {"during": [], "after": [], "alone": []}
    for started, ended in gets:
        i = bisect.bisect_right(starts, ended) - 1  # the last body begun before the GET ended
        if i >= 0 and bodies[i][1] > started:
            found["during"].append(ended - started)
        elif i >= 0 and started - bodies[i][1] < AFTER:
            found["after"].append(ended - started)
        elif i + 1 == len(bodies) or starts[i + 1] - ended >= QUIET:
            found["alone"].append(ended - started)
    return found


class Run:
    """The other tenant's GETs timed, and the hostile process's requests, together (see cost)."""

    def __init__(
        self, origin: str, token: str, victim: tuple[str, str], t: Targets, hostile: str = ""
    ) -> None:
        self.origin, self.token, self.victim, self.t = origin, token, victim, t
        self.hostile = hostile or origin  # where the hostile tenant sends (`token` is there)
        # Where an attacker's client is kept: the CPUs of the bulk process by default.
        allowed = os.sched_getaffinity(0)
        self.cpus = sorted(bulk_cpu_set("auto", allowed) or allowed)

    async def durations(self, mode: str, seconds: float, **options: float) -> list[float]:
        """How long each of the other tenant's GETs took (see __call__)."""
        return [ended - started for started, ended in (await self(mode, seconds, **options))[0]]

    async def __call__(
        self, mode: str, seconds: float, rate: float = 0.0, pace: float = 0.0
    ) -> tuple[list[Span], list[Span]]:
        """The GETs' spans (`pace` a second, or one after another), and the hostile tenant's
        (none if `mode` is "none")."""
        victim_token, user = self.victim
        argv = [sys.executable, "-m", "bench.cost", "victim"]
        victim = [self.origin, victim_token, user, seconds, pace]
        gets = partial(finished, [*argv, orjson.dumps(victim).decode()], session=True)
        if mode == "none":
            return orjson.loads((await asyncio.to_thread(gets)).out), []
        args = [self.hostile, self.token, asdict(self.t), self.cpus, mode, seconds, rate]
        hostile = subprocess.Popen(  # noqa: ASYNC220 (Popen does not wait)
            [sys.executable, "-m", "bench.cost", "hostile", orjson.dumps(args).decode()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
            preexec_fn=CHILD["preexec_fn"],
        )  # fmt: skip
        try:
            assert hostile.stdin is not None and hostile.stdout is not None
            if await asyncio.to_thread(hostile.stdout.readline) != b"ready\n":
                raise BenchError(f"the hostile process exited with {hostile.wait()}")
            timed = asyncio.create_task(asyncio.to_thread(gets))
            hostile.stdin.write(b"go\n")
            hostile.stdin.flush()
            out, _ = await asyncio.to_thread(hostile.communicate, timeout=seconds + TIMEOUT + 60)
            if hostile.returncode != 0:
                raise BenchError(f"the hostile process exited with {hostile.returncode}")
            return orjson.loads((await timed).out), orjson.loads(out)
        finally:
            if hostile.poll() is None:
                os.killpg(hostile.pid, signal.SIGTERM)
                hostile.wait()


@contextlib.asynccontextmanager
async def _elsewhere(dsn: str, cpus: list[int]) -> AsyncIterator[tuple[str, str, Targets]]:
    """A second scimledger on a database of its own (made from `dsn`'s server), it and its bulk
    process confined to `cpus`, as are the bulk process's PostgreSQL backends (which do the
    hostile bodies' database work): its origin, a tenant's token and targets, the tenant
    marked heavy (each shape sent once), so that all its bodies go to the bulk process."""
    own = await make_database(dsn, "bench_cost_elsewhere")
    token = create_tenant(own)
    async with scimledger(own, cpu_list(cpus)) as (origin, _):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT + 60)) as s:
            hostile = Scim(s, f"{origin}/scim/v2", token)
            t = await _targets(hostile)
            for shape in SHAPES:
                await _send(hostile, shape, shape.body(t), t)
        yield origin, token, t


async def cost(ctx: Ctx) -> None:
    """(9) the costliest bodies' server CPU; the other tenant's GET p99 while they run."""
    dsn = await make_database(ctx.dsn, "bench_cost")
    samples, seconds, phase = ctx.sizes.cost
    token, victim_token = create_tenant(dsn), create_tenant(dsn)
    async with scimledger(dsn) as (origin, proc):
        server = psutil.Process(proc.pid)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT + 60)) as hs:
            hostile = Scim(hs, f"{origin}/scim/v2", token)
            t = await _targets(hostile)
            bodies = [shape.body(t) for shape in SHAPES]
            victim_user = await Scim(hs, hostile.base, victim_token).create(
                "Users", _user("victim@contoso.com")
            )
            measured = []
            for shape, body in zip(SHAPES, bodies, strict=True):
                tries = [await _one(hostile, shape, body, t, server) for _ in range(samples)]
                worst = max(tries, key=lambda m: m.cpu)
                took = f"server CPU {worst.cpu:.3f} s, wall {worst.wall:.3f} s"
                err.print(f"{shape.name}: {worst.status}, {worst.size / 1024:,.0f} KiB, {took}")
                measured.append(worst)
        run = Run(origin, token, (victim_token, victim_user), t)
        err.print(f"the other tenant's GETs for {seconds:.0f} s, hostile bodies every other"
                  f" second from CPUs {cpu_list(run.cpus)}")  # fmt: skip
        gets, sent = await run("bodies", seconds)
        by = _classes(gets, sent)
        by["idle"] = await run.durations("none", phase)
        err.print(f"again, the other tenant's GETs {PACE:.0f} a second")
        paced = _classes(*await run("bodies", seconds, pace=PACE))
        paced["idle"] = await run.durations("none", phase, pace=PACE)
        err.print(f"again, the hostile bodies sent to a second server on CPUs {cpu_list(run.cpus)}")
        async with _elsewhere(ctx.dsn, run.cpus) as (elsewhere, token_b, t_b):
            control = Run(origin, token_b, run.victim, t_b, hostile=elsewhere)
            apart = _classes(*await control("bodies", seconds, pace=PACE))
        # As many plain requests a second as bodies were sent while sending, beside the loop.
        rate = max(len(sent) / (seconds / 2), 1.0)
        async with serving([sys.executable, "-c", HOG], None):
            by["floor"] = await run.durations("plain", phase, rate=rate)
            by["loop"] = await run.durations("none", phase)
    worst = max(measured, key=lambda m: m.cpu)
    runs = {"one after another": by, f"{PACE:.0f} a second": paced}
    if missing := [f"{name} ({how})" for how, run_ in {**runs, "elsewhere": apart}.items()
                   for name, xs in run_.items() if not xs]:  # fmt: skip
        raise BenchError(f"no GET {', '.join(missing)} in {seconds} s: the run is too short")
    p99s = {how: {name: percentile(xs, 99) for name, xs in run_.items()} for how, run_ in
            runs.items()}  # fmt: skip
    ratios = {how: p99["during"] / p99["alone"] for how, p99 in p99s.items()}
    a99 = {name: percentile(xs, 99) for name, xs in apart.items()}  # the machine's share
    met = max(ratios.values()) <= TARGET_P99_RATIO and all(
        m.cpu <= TARGET_CPU and m.status != "no answer" for m in measured
    )
    p99, q99 = p99s.values()
    ctx.add(Row("9", "the costliest request bodies (bench.cost): server CPU for one request;"
        " another tenant's GET p99 while they run", f"{len(measured)} shapes up to 2 MiB",
        f"most CPU {worst.cpu:.2f} s ({worst.shape}, {worst.status}); other tenant's p99, its"
        f" GETs one after another: {ms(p99['during'])} while a hostile body ran,"
        f" {ms(p99['alone'])} with none ({ratios['one after another']:.2f} times),"
        f" {ms(p99['after'])} just after one, {ms(p99['idle'])} with no hostile tenant,"
        f" {ms(p99['floor'])} beside as many plain requests and a CPU-bound loop,"
        f" {ms(p99['loop'])} beside the loop alone; {PACE:.0f} a second: {ms(q99['during'])}"
        f" while a hostile body ran, {ms(q99['alone'])} with none"
        f" ({ratios[f'{PACE:.0f} a second']:.2f} times), {ms(q99['after'])} just after one,"
        f" {ms(q99['idle'])} with no hostile tenant; {PACE:.0f} a second with the same bodies"
        f" sent to a second server confined with its bulk process's database backends to CPUs"
        f" {cpu_list(run.cpus)} (the machine's share): {ms(a99['during'])} while one ran,"
        f" {ms(a99['alone'])} with none ({a99['during'] / a99['alone']:.2f} times)",
        "", f"≤ {TARGET_CPU:.0f} s of CPU per request; the other tenant's p99 while they run"
        f" ≤ {TARGET_P99_RATIO} times with none, both ways", verdict(met)))  # fmt: skip
    shapes = "; ".join(f"{m.shape}: {m.status}, {m.cpu:.3f} s" for m in measured)
    ctx.notes.append(
        f"(9) each shape {samples} time(s) on an idle server, its CPU from /proc before and after;"
        f" the other tenant's GET /Users/{{id}} one after another from its own process and"
        f" session for {seconds:.0f} s, while the hostile tenant's process (on CPUs"
        f" {cpu_list(run.cpus)}, the bulk process's by default) sent the prebuilt shapes back to"
        f" back every other second ({len(sent)} bodies): {len(by['during'])} GETs while a body"
        f" was in flight, {len(by['after'])} within {AFTER:.1f} s after one, {len(by['alone'])}"
        f" with none within {AFTER:.1f} s before or {QUIET * 1000:.0f} ms after; {phase:.0f} s"
        f" with no hostile tenant ({len(by['idle'])}); then {phase:.0f} s while it sent"
        f" {rate:.0f} plain GETs a second, each on a new connection as each hostile body is,"
        f" beside `{HOG}` in a session of its own ({len(by['floor'])} GETs; the floor: as much"
        f" ordinary traffic on the event loop, and a program using a core, which the hostile"
        f" bodies' work is), and {phase:.0f} s beside the loop alone ({len(by['loop'])}); each"
        f" shape: {shapes}. The same again with the other tenant's GETs {PACE:.0f} a second,"
        f" each timed from when it was due: {len(paced['during'])} while a body was in flight,"
        f" {len(paced['after'])} after one, {len(paced['alone'])} with none,"
        f" {len(paced['idle'])} with no hostile tenant; and paced again with the hostile bodies"
        f" sent to a second `scimledger serve` (a database of its own in the same PostgreSQL; it,"
        f" its bulk process and that process's backends confined to CPUs {cpu_list(run.cpus)}):"
        f" {len(apart['during'])} while a body was in flight, {len(apart['alone'])} with none."
        f" The verdict is on this server's figures; the second server's show what the machine"
        f" makes the other tenant lose to that work wherever it is served"
    )


HOG = "while True: pass"


if __name__ == "__main__":  # the other tenant's GETs, or the hostile tenant (see cost)
    role, arguments = sys.argv[1], orjson.loads(sys.argv[2])
    main = _gets if role == "victim" else _hostile
    sys.stdout.write(orjson.dumps(asyncio.run(main(*arguments))).decode())
