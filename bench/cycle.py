"""Row (4): Entra's initial cycle with 8 connections, in Entra's order, on a tenant of its own;
the same cycle again with 16 connections tells who set the pace."""

from __future__ import annotations

import os
import random
import uuid

import aiohttp
import orjson
from rich.progress import Progress

from bench.common import (
    ENTERPRISE,
    PATCH_OP,
    BenchError,
    Cpu,
    Meter,
    create_tenant,
    drain,
    entra_body,
    progress_bar,
    send,
    verdict,
)
from bench.groups import group_body, members_patch
from bench.table import Ctx, Row

CONNECTIONS = 8
MEMBER_BATCH = 100  # member ids per PATCH in the Entra cycle (ENTRA.md: "several")


async def entra_cycle(
    session: aiohttp.ClientSession,
    base: str,
    token: str,
    sizes: tuple[int, int, int],
    meter: Meter,
    progress: Progress,
    connections: int = CONNECTIONS,
) -> tuple[int, Cpu]:
    """Entra's initial cycle with `connections`: users (lookup, create), managers, groups
    (lookup, create), then memberships in PATCHes of ≤ MEMBER_BATCH; (requests, CPU)."""
    n_users, n_groups, n_members = sizes
    rng = random.Random(8)
    run = uuid.uuid4().hex[:6]
    ids: list[str] = [""] * n_users
    group_ids: list[str] = [""] * n_groups
    requests = 0
    total = 3 * n_users - 1 + 2 * n_groups + -(-n_members // MEMBER_BATCH)
    task = progress.add_task(
        f"Entra cycle {n_users:,}/{n_groups}/{n_members:,}, {connections} connections",
        total=total,
        rate="",
    )

    async def call(method: str, url: str, body: bytes | None, expect: tuple[int, ...]) -> bytes:
        nonlocal requests
        raw = await send(session, method, url, token, body, expect)
        requests += 1
        progress.advance(task)
        return raw

    async def absent(kind: str, attribute: str, value: str, extra: str = "") -> None:
        quoted = value.replace("@", "%40").replace(" ", "+")
        url = f"{base}/{kind}?{extra}filter={attribute}+eq+%22{quoted}%22"
        if orjson.loads(await call("GET", url, None, (200,)))["totalResults"] != 0:
            raise BenchError(f"{value} should not exist yet")

    async def user(i: int) -> None:
        name = f"Cycle_{run}_{i:06d}@Contoso.com"
        await absent("Users", "userName", name)
        created = await call("POST", f"{base}/Users", entra_body(i, name), (201,))
        ids[i] = orjson.loads(created)["id"]

    async def manager(i: int) -> None:
        op = {"op": "add", "path": f"{ENTERPRISE}:manager", "value": ids[(i - 1) // 10]}
        patch = orjson.dumps({"schemas": [PATCH_OP], "Operations": [op]})
        await call("PATCH", f"{base}/Users/{ids[i]}", patch, (200, 204))

    async def group(g: int) -> None:
        display = f"Cycle {run} Group {g:04d}"
        await absent("Groups", "displayName", display, "excludedAttributes=members&")
        created = await call("POST", f"{base}/Groups", group_body(display), (201,))
        group_ids[g] = orjson.loads(created)["id"]

    batches: list[tuple[int, list[int]]] = []
    for g in range(n_groups):
        count = n_members // n_groups + (1 if g < n_members % n_groups else 0)
        picked = rng.sample(range(n_users), min(count, n_users))
        batches += [(g, picked[k : k + MEMBER_BATCH]) for k in range(0, len(picked), MEMBER_BATCH)]

    async def members(b: int) -> None:
        g, chosen = batches[b]
        body = members_patch("Add", [ids[u] for u in chosen])
        await call("PATCH", f"{base}/Groups/{group_ids[g]}", body, (200, 204))

    before = meter.read()
    await drain(range(n_users), user, connections)
    await drain(range(1, n_users), manager, connections)
    await drain(range(n_groups), group, connections)
    await drain(range(len(batches)), members, connections)
    return requests, meter.since(before)


async def cycle(ctx: Ctx) -> None:
    """(4) the cycle at 8 connections and, on a fresh tenant, at 16."""
    (session, ours), sizes = ctx.http(), ctx.sizes.cycle
    with progress_bar() as progress:
        requests, c = await entra_cycle(
            session, ours.base, create_tenant(ctx.dsn), sizes, ours.meter, progress
        )
        # The same cycle, on a tenant of its own, by a client with twice the connections:
        # if we set the pace at 8, more connections cannot make it go faster.
        wider, w = await entra_cycle(
            session,
            ours.base,
            create_tenant(ctx.dsn),
            sizes,
            ours.meter,
            progress,
            2 * CONNECTIONS,
        )
    rate, wider_rate = requests / c.seconds, wider / w.seconds
    speedup = wider_rate / rate
    busiest = max(
        (("client", c.client), ("server", c.server), ("postgres", c.postgres or 0.0)),
        key=lambda x: x[1],
    )
    ok: bool | None = speedup >= 1.2 or busiest[0] == "client"
    limit = f"{2 * CONNECTIONS} connections: {wider_rate:,.0f} req/s = {speedup:.2f} x the rate at"
    limit += (
        f" {CONNECTIONS}, so at {CONNECTIONS} the client's connections set the pace"
        if speedup >= 1.2
        else f" {CONNECTIONS}; busiest at {CONNECTIONS}: {busiest[0]}"
        f" ({busiest[1] / c.seconds:.2f} cores)"
    )
    # CPU left for the run: what other processes on the machine did not take.
    if not ok and c.machine / c.seconds >= 0.9 * (os.cpu_count() or 1):
        ok = None
        limit += (
            f"; but the machine was full ({c.others / c.seconds:.2f} cores taken by"
            " other processes): inconclusive"
        )
    users_n, groups_n, members_n = sizes
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
