"""Row (2): GET /Users?filter=userName eq "…" with wrk at three store sizes, ours (seeded in
bulk) and the peer's (seeded through its POST /Users, within a time limit per size)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from bench import wrk
from bench.common import NAME_FORMAT, drain, entra_body, wait_for_projections
from bench.posts import seed_users, wrk_phase
from bench.table import CONCURRENCY, Ctx, Row, Server, verdict

SPARE = 200  # users in no group, for the add/remove pairs


class PeerSeeder:
    """Users 0, 1, … through the peer's POST /Users at concurrency 16, their ids kept."""

    def __init__(self, session: aiohttp.ClientSession, peer: Server, ids: dict[int, str]) -> None:
        self.scim, self.ids = peer.scim(session), ids
        self.stored = 0  # users of whole seeding steps
        self.landed = 0  # users it answered 201 for
        # Set once its growth timed out: it is grown no further (POSTs cut short by the timeout
        # may have landed all the same, and resuming would send their userNames again: 409).
        self.stopped = False

    async def one(self, i: int) -> None:
        """User i, Entra's body less `"manager": null`, which scim2-server refuses."""
        body = orjson.loads(entra_body(i))
        body.pop("manager", None)
        self.ids[i] = await self.scim.create("Users", orjson.dumps(body))
        self.landed += 1

    async def grow(self, size: int, limit: float) -> str:
        """Grow to `size` users within `limit` seconds; why not, if it could not."""
        if self.stopped:
            return f"not grown past {self.stored:,} (its time ran out at a smaller size)"
        try:
            await asyncio.wait_for(drain(range(self.stored, size), self.one, CONCURRENCY), limit)
            self.stored = max(self.stored, size)
        except TimeoutError:
            self.stopped = True
            reached = f"its POSTs reached {self.landed:,} users of {size:,} in {limit:.0f} s"
            return f"{reached}: measured there, asking for the first {self.stored:,}"
        return ""


async def lookups(ctx: Ctx) -> None:
    """(2) GET by userName at three store sizes, ours and the peer's."""
    s, (session, ours), peer = ctx.sizes, ctx.http(), ctx.peer
    seeder = PeerSeeder(session, peer, ctx.peer_ids) if peer is not None else None
    seeded = catch_up = base_rate = 0.0
    what = f'GET /Users?filter=userName eq "…", concurrency {CONCURRENCY} (wrk)'
    for size in s.users:
        seeded += await seed_users(ctx, size, max(s.groups) + SPARE)
        catch_up += await wait_for_projections(ctx.dsn, 3600)
        script = wrk.find_users_script("/scim/v2/Users", ours.token, size, NAME_FORMAT)
        await wrk_phase(ours, script, 2)
        got, cpu = await wrk_phase(ours, script, s.get_seconds, f"scimledger GET at {size:,}")
        base_rate = base_rate or got.rate
        row = Row("2", what, f"{size:,} users", got.text(p50=False), ctx.no_peer, cpu=cpu.text())
        if size == s.users[-1]:
            ok = got.p99 <= 0.010 and got.rate >= 0.8 * base_rate
            row.target = f"p99 ≤ 10 ms and ≥ 0.8 x the rate at {s.users[0]:,}"
            row.verdict = f"{verdict(ok)}: {got.rate / base_rate:.2f} x the rate at {s.users[0]:,}"
        if peer is not None and seeder is not None:
            why = await seeder.grow(size, s.peer_seed_timeout)
            row.peer = why or "no users stored"
            if seeder.stored:
                script = wrk.find_users_script("/v2/Users", peer.token, seeder.stored, NAME_FORMAT)
                theirs, _ = await wrk_phase(peer, script, s.get_seconds, "scim2-server GET")
                row.peer = theirs.text(p50=False) + (f" ({why})" if why else "")
                ratio = f"{got.rate / theirs.rate:.1f} x the peer's rate"
                row.verdict = "; ".join(part for part in (row.verdict, ratio) if part)
        ctx.add(row)
    ctx.notes.append(
        f"(2) {ctx.stored:,} users seeded in {seeded:,.0f} s"
        f" ({ctx.stored / max(seeded, 1e-9):,.0f}/s) straight into the store: what POST /Users"
        " commits, made by the service's code, one statement per user (synchronous_commit=off);"
        f" the asynchronous projections then caught up ({catch_up:,.0f} s) before each measurement"
    )
    ctx.notes.append(
        "(2) random stored users in random case, a reply right only with totalResults 1; with"
        " 16 requests in flight, a p99 ≤ 10 ms needs well over 1,600 req/s (Little's law)"
    )
    if peer is not None:
        ctx.notes.append(
            f"(2, 8) the peer seeded by its POST /Users, at most {s.peer_seed_timeout:.0f} s"
            ' per size, Entra\'s body less `"manager": null` (it refuses it); it answers'
            " HTTP/1.0 without keep-alive, so wrk reconnects per request"
        )


async def ensure_users(ctx: Ctx, n: int) -> None:
    """At least n users stored (ours, and the peer's within its limit) when (2) did not run."""
    if ctx.stored < n:
        await seed_users(ctx, n, n)
        await wait_for_projections(ctx.dsn, 3600)
    session, _ = ctx.http()
    if ctx.peer is not None and not ctx.peer_ids:
        started = time.perf_counter()
        await PeerSeeder(session, ctx.peer, ctx.peer_ids).grow(n, ctx.sizes.peer_seed_timeout)
        ctx.notes.append(f"(3) the peer's users seeded in {time.perf_counter() - started:.0f} s")
