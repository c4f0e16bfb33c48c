"""Row (3): adding and removing one member of groups of three sizes, one request at a time
(writes to one group serialise by design), sizes taking turns in rounds; groups made and grown
with Entra's bodies (the peer's without the ADSCIM URN, removes by filter path: it refuses
Entra's)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import perf_counter

import aiohttp
import orjson
from rich.progress import Progress

from bench.common import PATCH_OP, Cpu, ms, percentile, progress_bar, send, verdict
from bench.lookups import SPARE, ensure_users
from bench.table import Ctx, Row, Server

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
    value = [{"$ref": None, "value": i} for i in ids]
    return orjson.dumps(
        {"schemas": [PATCH_OP], "Operations": [{"op": op, "path": "members", "value": value}]}
    )


@dataclass
class Measured:
    size: int
    group_id: str
    add: list[float] = field(default_factory=list)
    remove: list[float] = field(default_factory=list)
    cpu: Cpu = field(default_factory=Cpu)


class Groups:
    """The group requests on one server; every reply is checked."""

    def __init__(
        self, session: aiohttp.ClientSession, server: Server, spare: list[str], peer: bool
    ) -> None:
        self.session, self.server, self.spare, self.peer = session, server, spare, peer
        self.turn = 0

    def url(self, group_id: str) -> str:
        return f"{self.server.base}/Groups/{group_id}"

    async def create(self, name: str) -> str:
        body = group_body(name, entra=not self.peer)
        url = f"{self.server.base}/Groups"
        raw = await send(self.session, "POST", url, self.server.token, body, (201,))
        return str(orjson.loads(raw)["id"])

    async def patch(self, url: str, body: bytes) -> None:
        await send(self.session, "PATCH", url, self.server.token, body, (200, 204))

    async def grow(self, g: Measured, members: list[str], progress: Progress) -> None:
        task = progress.add_task(f"grow → {len(members):,} members", total=len(members), rate="")
        for k in range(0, len(members), BATCH):
            await self.patch(self.url(g.group_id), members_patch("Add", members[k : k + BATCH]))
            progress.update(task, completed=min(len(members), k + BATCH))

    def pair(self, user: str) -> tuple[bytes, bytes]:
        if not self.peer:
            return members_patch("Add", [user]), members_patch("Remove", [user])
        remove = {"op": "remove", "path": f'members[value eq "{user}"]'}
        return members_patch("Add", [user]), orjson.dumps(
            {"schemas": [PATCH_OP], "Operations": [remove]}
        )

    async def pairs(self, g: Measured, n: int, keep: bool = True) -> None:
        """n add/remove pairs, one request at a time, each with the next spare user."""
        url = self.url(g.group_id)
        bodies = [self.pair(self.spare[(self.turn + k) % len(self.spare)]) for k in range(n)]
        self.turn += n
        before = self.server.meter.read()
        for add, remove in bodies:
            t0 = perf_counter()
            await self.patch(url, add)
            t1 = perf_counter()
            await self.patch(url, remove)
            if keep:
                g.add.append(t1 - t0)
                g.remove.append(perf_counter() - t1)
        if keep:
            g.cpu += self.server.meter.since(before)

    async def rounds(self, groups: list[Measured], pairs: int, warmup: int) -> None:
        """Warm-up, then the rounds: every size in turn, so that noise hits them all alike."""
        for g in groups:
            await self.pairs(g, warmup, keep=False)
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
    run = Groups(session, server, [ids[k] for k in available[-SPARE:]], peer)
    limit = s.peer_group_timeout if peer else None
    measured: list[Measured] = []
    bounded: list[str] = []
    with progress_bar() as progress:
        for size in s.groups:
            if size > len(members):
                bounded.append(f"{size:,}: only {len(members):,} users stored")
                continue
            name = f"Bench {who} Group {size:,} {uuid.uuid4().hex[:6]}"
            g = Measured(size, await run.create(name))
            try:
                await asyncio.wait_for(run.grow(g, members[:size], progress), limit)
            except TimeoutError:
                bounded.append(
                    f"{size:,}: growing the group by PATCHes of 500 did not finish in {limit:.0f} s"
                )
                break
            measured.append(g)
        task = progress.add_task(f"{who}: add/remove pairs", total=None, rate="")
        try:
            pairs = min(s.pairs, PEER_PAIRS) if peer else s.pairs
            await asyncio.wait_for(run.rounds(measured, pairs, 2 if peer else 10), limit)
        except TimeoutError:
            done = ", ".join(f"{len(g.add)} at {g.size:,}" for g in measured)
            bounded.append(f"pairs: cut short after {limit:.0f} s; pairs measured: {done}")
            measured = [g for g in measured if g.add and g.remove]
        progress.update(task, total=1, completed=1)
    for text in bounded:
        ctx.notes.append(f"(3, 8) peer {text}" if peer else f"(3) scimledger: {text}")
    return measured


async def groups(ctx: Ctx) -> None:
    """(3) add / remove one member at three group sizes, ours and the peer's."""
    await ensure_users(ctx, max(ctx.sizes.groups) + SPARE)
    _, ours = ctx.http()
    mine = await measure(ctx, ours, ctx.ids, "scimledger")
    small = mine[0] if mine else None
    rows: dict[int, Row] = {}
    p50: dict[int, tuple[float, float]] = {}  # ours, by size
    for g in mine:
        add, rem = percentile(g.add, 50), percentile(g.remove, 50)
        p50[g.size] = (add, rem)
        target = verdict_text = ""
        if small is not None and g is mine[-1] and g is not small:
            ra, rr = add / percentile(small.add, 50), rem / percentile(small.remove, 50)
            target = f"within 1.2 x of {small.size}"
            verdict_text = f"{verdict(ra <= 1.2 and rr <= 1.2)}: add {ra:.2f} x, remove {rr:.2f} x"
        rows[g.size] = Row(
            "3",
            "add / remove one member, one request at a time",
            f"{g.size:,} members",
            f"add p50 {ms(add)} (p99 {ms(percentile(g.add, 99))}), remove p50 {ms(rem)}"
            f" (p99 {ms(percentile(g.remove, 99))})",
            ctx.no_peer,
            target,
            verdict_text,
            g.cpu.text(),
        )
    ctx.notes.append(
        f"(3) groups grown by Entra-style PATCH adds of 500 ids; {ctx.sizes.pairs} add/remove"
        f" pairs per size, sizes taking turns in {ROUNDS} rounds (bench.groups)"
    )
    if ctx.peer is not None:
        theirs = {g.size: g for g in await measure(ctx, ctx.peer, ctx.peer_ids, "peer")}
        for size, row in rows.items():
            g = theirs.get(size)
            if g is None:
                row.peer = "not measured (see the notes)"
                continue
            add, rem = percentile(g.add, 50), percentile(g.remove, 50)
            row.peer = f"add p50 {ms(add)}, remove p50 {ms(rem)} ({len(g.add)} pairs)"
            a, r = p50[size]
            ratio = f"peer's p50 / ours: add {add / a:.1f} x, remove {rem / r:.1f} x"
            row.verdict = "; ".join(part for part in (row.verdict, ratio) if part)
        ctx.notes.append(
            "(3, 8) peer groups: created without the ADSCIM schema URN and members removed with"
            ' a filter path (`members[value eq "id"]`): scim2-server refuses Entra\'s group body'
            " and its remove-with-value style"
        )
    for row in rows.values():
        ctx.add(row)
