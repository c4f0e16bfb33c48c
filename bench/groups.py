"""Row (3): adding and removing one member of groups of three sizes, one request at a time
(writes to one group serialise by design), sizes taking turns in rounds; groups made and grown
with Entra's bodies (the peer's without the ADSCIM URN, removes by filter path: it refuses
Entra's). Row (4): Entra's initial cycle with 8 connections, in Entra's order, on a tenant of
its own; the same cycle again with 16 connections tells who set the pace."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import perf_counter

import orjson

from bench.common import (
    ENTERPRISE,
    PROGRESS,
    BenchError,
    Cpu,
    Scim,
    create_tenant,
    drain,
    entra_body,
    patch_body,
)
from bench.lookups import SPARE, ensure_users
from bench.table import Ctx, Row, Server, ms, percentile, verdict

GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
AD_GROUP_SCHEMA = "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"
BATCH = 500  # member ids per growing PATCH
ROUNDS = 5
PEER_PAIRS = 40


def group_body(name: str, *, entra: bool = True) -> bytes:
    """Entra's POST /Groups: no members (they follow by PATCH), the ADSCIM schema URN."""
    schemas = [GROUP_SCHEMA, AD_GROUP_SCHEMA] if entra else [GROUP_SCHEMA]
    body = {"schemas": schemas, "externalId": str(uuid.uuid4()), "displayName": name}
    return orjson.dumps(body | ({"meta": {"resourceType": "Group"}} if entra else {}))


def members_patch(op: str, ids: Sequence[str]) -> bytes:
    """Entra's default style, for adds and for removes: the members in `value`."""
    operation = {"op": op, "path": "members", "value": [{"$ref": None, "value": i} for i in ids]}
    return patch_body([operation])


@dataclass
class Measured:
    size: int
    group_id: str
    add: list[float] = field(default_factory=list)
    remove: list[float] = field(default_factory=list)
    cpu: Cpu = field(default_factory=Cpu)


class Groups:
    """The group requests on one server; every reply is checked."""

    def __init__(self, scim: Scim, server: Server, spare: list[str], peer: bool) -> None:
        self.scim, self.server, self.spare, self.peer = scim, server, spare, peer
        self.turn = 0

    async def patch(self, group_id: str, body: bytes) -> None:
        await self.scim.send("PATCH", f"/Groups/{group_id}", body, (200, 204))

    async def grow(self, g: Measured, members: list[str]) -> None:
        task = PROGRESS.add_task(f"grow → {len(members):,} members", total=len(members))
        for k in range(0, len(members), BATCH):
            await self.patch(g.group_id, members_patch("Add", members[k : k + BATCH]))
            PROGRESS.update(task, completed=min(len(members), k + BATCH))

    def pair(self, user: str) -> tuple[bytes, bytes]:
        if not self.peer:
            return members_patch("Add", [user]), members_patch("Remove", [user])
        remove = {"op": "remove", "path": f'members[value eq "{user}"]'}
        return members_patch("Add", [user]), patch_body([remove])

    async def pairs(self, g: Measured, n: int) -> None:
        """n add/remove pairs, one request at a time, each with the next spare user."""
        bodies = [self.pair(self.spare[(self.turn + k) % len(self.spare)]) for k in range(n)]
        self.turn += n
        before = self.server.meter.read()
        for add, remove in bodies:
            t0 = perf_counter()
            await self.patch(g.group_id, add)
            t1 = perf_counter()
            await self.patch(g.group_id, remove)
            g.add.append(t1 - t0)
            g.remove.append(perf_counter() - t1)
        g.cpu += self.server.meter.since(before)

    async def rounds(self, groups: list[Measured], pairs: int, warmup: int) -> None:
        """Warm-up (not kept), then the rounds: every size in turn, so that noise hits them all
        alike."""
        for g in groups:
            await self.pairs(Measured(g.size, g.group_id), warmup)
        for r in range(ROUNDS):
            for g in groups:
                await self.pairs(g, pairs // ROUNDS + (1 if r < pairs % ROUNDS else 0))


async def measure(ctx: Ctx, server: Server, ids: dict[int, str], who: str) -> list[Measured]:
    """Our groups or the peer's, each size grown and measured; bounds met go to the notes."""
    s, (session, _) = ctx.sizes, ctx.http()
    peer = who == "peer"
    available = sorted(k for k in ids if k < max(s.groups) + SPARE)
    if len(available) < SPARE + 1:
        ctx.notes.append(f"(3) {who}: too few users stored for the group measurements")
        return []
    members = [ids[k] for k in available[:-SPARE]]
    run = Groups(server.scim(session), server, [ids[k] for k in available[-SPARE:]], peer)
    limit = s.peer_group_timeout if peer else None
    measured: list[Measured] = []
    bounded: list[str] = []
    for size in s.groups:
        if size > len(members):
            bounded.append(f"{size:,}: only {len(members):,} users stored")
            continue
        name = f"Bench {who} Group {size:,} {uuid.uuid4().hex[:6]}"
        g = Measured(size, await run.scim.create("Groups", group_body(name, entra=not peer)))
        try:
            await asyncio.wait_for(run.grow(g, members[:size]), limit)
        except TimeoutError:
            growing = f"growing the group by PATCHes of {BATCH}"
            bounded.append(f"{size:,}: {growing} did not finish in {limit:.0f} s")
            break
        measured.append(g)
    task = PROGRESS.add_task(f"{who}: add/remove pairs", total=None)
    try:
        pairs = min(s.pairs, PEER_PAIRS) if peer else s.pairs
        await asyncio.wait_for(run.rounds(measured, pairs, 2 if peer else 10), limit)
    except TimeoutError:
        done = ", ".join(f"{len(g.add)} at {g.size:,}" for g in measured)
        bounded.append(f"pairs: cut short after {limit:.0f} s; pairs measured: {done}")
        measured = [g for g in measured if g.add and g.remove]
    PROGRESS.update(task, total=1, completed=1)
    for text in bounded:
        ctx.notes.append(f"(3, 8) peer {text}" if peer else f"(3) scimledger: {text}")
    return measured


async def groups(ctx: Ctx) -> None:
    """(3) add / remove one member at three group sizes, ours and the peer's."""
    await ensure_users(ctx, max(ctx.sizes.groups) + SPARE)
    _, ours = ctx.http()
    mine = await measure(ctx, ours, ctx.ids, "scimledger")
    ctx.notes.append(
        f"(3) groups grown by Entra-style PATCH adds of {BATCH} ids; {ctx.sizes.pairs} add/remove"
        f" pairs per size, sizes taking turns in {ROUNDS} rounds (bench.groups)"
    )
    theirs: dict[int, Measured] = {}
    if ctx.peer is not None:
        theirs = {g.size: g for g in await measure(ctx, ctx.peer, ctx.peer_ids, "peer")}
        ctx.notes.append(
            "(3, 8) peer groups: created without the ADSCIM schema URN and members removed with"
            ' a filter path (`members[value eq "id"]`): scim2-server refuses Entra\'s group body'
            " and its remove-with-value style"
        )
    for g in mine:
        add, rem = percentile(g.add, 50), percentile(g.remove, 50)
        row = Row("3", "add / remove one member, one request at a time", f"{g.size:,} members",
            f"add p50 {ms(add)} (p99 {ms(percentile(g.add, 99))}),"
            f" remove p50 {ms(rem)} (p99 {ms(percentile(g.remove, 99))})", ctx.no_peer,
            cpu=g.cpu.text())  # fmt: skip
        if g is mine[-1] and g is not mine[0]:
            small = mine[0]
            ra, rr = add / percentile(small.add, 50), rem / percentile(small.remove, 50)
            row.target = f"within 1.2 x of {small.size}"
            row.verdict = f"{verdict(ra <= 1.2 and rr <= 1.2)}: add {ra:.2f} x, remove {rr:.2f} x"
        if (t := theirs.get(g.size)) is not None:
            peer_add, peer_rem = percentile(t.add, 50), percentile(t.remove, 50)
            row.peer = f"add p50 {ms(peer_add)}, remove p50 {ms(peer_rem)} ({len(t.add)} pairs)"
            ratio = f"peer's p50 / ours: add {peer_add / add:.1f} x, remove {peer_rem / rem:.1f} x"
            row.verdict = "; ".join(part for part in (row.verdict, ratio) if part)
        elif ctx.peer is not None:
            row.peer = "not measured (see the notes)"
        ctx.add(row)


CONNECTIONS = 8
MEMBER_BATCH = 100  # member ids per PATCH in the Entra cycle (ENTRA.md: "several")


async def entra_cycle(ctx: Ctx, token: str, connections: int = CONNECTIONS) -> tuple[int, Cpu]:
    """Entra's initial cycle with `connections`: users (lookup, create), managers, groups
    (lookup, create), then memberships in PATCHes of ≤ MEMBER_BATCH; (requests, CPU)."""
    (session, ours), (n_users, n_groups, n_members) = ctx.http(), ctx.sizes.cycle
    scim, rng = Scim(session, ours.base, token), random.Random(8)
    run = uuid.uuid4().hex[:6]
    ids: list[str] = [""] * n_users
    group_ids: list[str] = [""] * n_groups
    batches: list[tuple[int, list[int]]] = []
    for g in range(n_groups):
        count = n_members // n_groups + (1 if g < n_members % n_groups else 0)
        picked = rng.sample(range(n_users), min(count, n_users))
        batches += [(g, picked[k : k + MEMBER_BATCH]) for k in range(0, len(picked), MEMBER_BATCH)]

    total = 3 * n_users - 1 + 2 * n_groups + len(batches)  # every request, each checked
    what = f"Entra cycle {n_users:,}/{n_groups}/{n_members:,}, {connections} connections"
    task = PROGRESS.add_task(what, total=total)

    async def call(method: str, path: str, body: bytes | None, expect: tuple[int, ...]) -> bytes:
        raw = await scim.send(method, path, body, expect)
        PROGRESS.advance(task)
        return raw

    async def absent(kind: str, attribute: str, value: str, extra: str = "") -> None:
        quoted = value.replace("@", "%40").replace(" ", "+")
        path = f"/{kind}?{extra}filter={attribute}+eq+%22{quoted}%22"
        if orjson.loads(await call("GET", path, None, (200,)))["totalResults"] != 0:
            raise BenchError(f"{value} should not exist yet")

    async def user(i: int) -> None:
        name = f"Cycle_{run}_{i:06d}@Contoso.com"
        await absent("Users", "userName", name)
        created = await call("POST", "/Users", entra_body(i, name), (201,))
        ids[i] = orjson.loads(created)["id"]

    async def manager(i: int) -> None:
        op = {"op": "add", "path": f"{ENTERPRISE}:manager", "value": ids[(i - 1) // 10]}
        await call("PATCH", f"/Users/{ids[i]}", patch_body([op]), (200, 204))

    async def group(g: int) -> None:
        display = f"Cycle {run} Group {g:04d}"
        await absent("Groups", "displayName", display, "excludedAttributes=members&")
        created = await call("POST", "/Groups", group_body(display), (201,))
        group_ids[g] = orjson.loads(created)["id"]

    async def members(b: int) -> None:
        g, chosen = batches[b]
        body = members_patch("Add", [ids[u] for u in chosen])
        await call("PATCH", f"/Groups/{group_ids[g]}", body, (200, 204))

    before = ours.meter.read()
    await drain(range(n_users), user, connections)
    await drain(range(1, n_users), manager, connections)
    await drain(range(n_groups), group, connections)
    await drain(range(len(batches)), members, connections)
    return total, ours.meter.since(before)


async def cycle(ctx: Ctx) -> None:
    """(4) the cycle at 8 connections and, on a fresh tenant, at 16."""
    requests, c = await entra_cycle(ctx, create_tenant(ctx.dsn))
    # The same cycle, on a tenant of its own, by a client with twice the connections:
    # if we set the pace at 8, more connections cannot make it go faster.
    wider, w = await entra_cycle(ctx, create_tenant(ctx.dsn), 2 * CONNECTIONS)
    rate, wider_rate = requests / c.seconds, wider / w.seconds
    speedup = wider_rate / rate
    cpu = {"client": c.client, "server": c.server, "postgres": c.postgres or 0.0}
    busiest = max(cpu.items(), key=lambda x: x[1])
    ok: bool | None = speedup >= 1.2 or busiest[0] == "client"
    limit = f"{2 * CONNECTIONS} connections: {wider_rate:,.0f} req/s = {speedup:.2f} x the rate at"
    if speedup >= 1.2:
        limit += f" {CONNECTIONS}, so at {CONNECTIONS} the client's connections set the pace"
    else:
        limit += f" {CONNECTIONS}; busiest at {CONNECTIONS}: {busiest[0]}"
        limit += f" ({busiest[1] / c.seconds:.2f} cores)"
    # CPU left for the run: what other processes on the machine did not take.
    if not ok and c.machine / c.seconds >= 0.9 * (os.cpu_count() or 1):
        ok = None
        limit += f"; but the machine was full ({c.others / c.seconds:.2f} cores taken by"
        limit += " other processes): inconclusive"
    users_n, groups_n, members_n = ctx.sizes.cycle
    ctx.add(Row("4", f"Entra initial cycle, {CONNECTIONS} connections (aiohttp client)",
        f"{users_n:,} users, {groups_n} groups, {members_n:,} memberships",
        f"{c.seconds:,.1f} s, {requests:,} requests, {rate:,.0f} req/s;"
        f" mean {CONNECTIONS / rate * 1000:.1f} ms per request", "",
        "limited by the client, not by us", f"{verdict(ok)}: {limit}", c.text()))  # fmt: skip
    ctx.notes.append(
        "(4) users (GET filter → POST), managers (PATCH), groups (GET filter → POST), then"
        f" member adds ≤ {MEMBER_BATCH} per PATCH; met when the same cycle with"
        f" {2 * CONNECTIONS} connections is ≥ 1.2 x faster, or the client was the busiest."
        f" With {2 * CONNECTIONS}: {w.seconds:,.1f} s, {wider:,} requests; CPU {w.text()}"
    )
