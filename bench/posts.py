"""Rows (1) POST /Users with wrk, ours and the peer's, and (7) the floor: the same rows by plain
asyncpg. Also the bulk seeding of users the other rows stand on (what a POST commits, made by
the service's own code)."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson

from bench import wrk
from bench.common import PROGRESS, BenchError, Cpu, Meter, entra_body, err, py_spy
from bench.table import CONCURRENCY, Ctx, Row, Server, ms, percentile, verdict
from domain.request import ProvisioningRequest
from domain.user import User
from infra.database import create_pool
from infra.tenants import authenticate
from infra.transcoder import make_mapper
from projections import users as users_view
from service.scim.representation import user_from_scim

# Both stored events and the view row in one statement: one round trip, one transaction.
STORED_COLUMNS = ("originator_id", "originator_version", "topic", "state")  # $1 to $4
POST_ROWS_SQL = f"""
WITH events AS (
    INSERT INTO stored_events ({", ".join(STORED_COLUMNS)}, tenant_id, request_id)
    SELECT e.o, e.v, e.t, e.s, $5::uuid, $6::text
    FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bytea[]) AS e (o, v, t, s)
)
INSERT INTO scim_users ({users_view.COLUMNS})
VALUES ($5, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
"""


class RowMaker:
    """What the service writes for Entra's POST /Users, made by the service's own code."""

    def __init__(self, tenant_id: uuid.UUID, token_name: str) -> None:
        self.tenant_id, self.token_name, self.mapper = tenant_id, token_name, make_mapper()

    def make(self, body: bytes) -> tuple[uuid.UUID, tuple[Any, ...]]:
        """The user's id and the arguments of POST_ROWS_SQL."""
        user = User.provision(uuid.uuid4(), self.tenant_id, user_from_scim(orjson.loads(body)))
        described = {"method": "POST", "path": "/scim/v2/Users", "status": 201,
            "initiatedBy": self.token_name, "client": "127.0.0.1", "targetType": "User",
            "targetId": None, "durationMs": 2.0}  # fmt: skip
        record = ProvisioningRequest.record(uuid.uuid4(), self.tenant_id, "success", described)
        events = [*user.collect_events(), *record.collect_events()]
        stored = [self.mapper.to_stored_event(e) for e in events]
        arrays = [[getattr(s, c) for s in stored] for c in STORED_COLUMNS]
        return user.id, (*arrays, self.tenant_id, uuid.uuid4().hex, *users_view.row_of(user)[1:])


async def row_maker(dsn: str, token: str) -> RowMaker:
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        principal = await authenticate(pool, token)
    finally:
        await pool.close()
    assert principal is not None
    return RowMaker(principal.tenant_id, principal.token_name)


async def insert(pool: asyncpg.Pool, n: int, args: Callable[[int], Any], task: str) -> list[float]:
    """POST_ROWS_SQL with args(i) for i in range(n), on every connection of `pool`; the seconds
    of each statement."""
    latencies, counter, shown = [0.0] * n, iter(range(n)), PROGRESS.add_task(task, total=n)

    async def worker() -> None:
        async with pool.acquire() as conn:
            for i in counter:
                row, t0 = args(i), time.perf_counter()
                await conn.execute(POST_ROWS_SQL, *row)
                latencies[i] = time.perf_counter() - t0
                PROGRESS.advance(shown)

    await asyncio.gather(*(worker() for _ in range(pool.get_max_size())))
    return latencies


async def seed_users(ctx: Ctx, last: int, keep: int) -> float:
    """Users ctx.stored..last-1 (NAME_FORMAT), straight into the store; seconds. The
    ids of users below `keep` go to ctx.ids (the group members)."""
    first, started = ctx.stored, time.perf_counter()
    if last <= first:
        return 0.0
    ctx.stored, maker = last, await row_maker(ctx.dsn, ctx.http()[1].token)

    def made(k: int) -> tuple[Any, ...]:
        user_id, row = maker.make(entra_body(first + k))
        if first + k < keep:
            ctx.ids[first + k] = str(user_id)
        return row

    settings = {"synchronous_commit": "off"}
    pool = await create_pool(ctx.dsn, min_size=4, max_size=4, server_settings=settings)
    try:
        await insert(pool, last - first, made, f"seed users → {last:,}")
    finally:
        await pool.close()
    return time.perf_counter() - started


async def floor(ctx: Ctx, maker: RowMaker) -> tuple[float, list[float], Cpu]:
    """The users' rows (made beforehand) by plain asyncpg, one statement each, concurrency 16."""
    n, meter = ctx.sizes.floor_rows, Meter(None, ctx.postmaster)
    rows = [maker.make(entra_body(10_000_000 + i))[1] for i in range(n)]

    def dumps(value: object) -> str:
        return orjson.dumps(value).decode()

    async def jsonb(conn: asyncpg.Connection) -> None:
        await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=dumps, decoder=orjson.loads)

    size = CONCURRENCY
    pool = await asyncpg.create_pool(ctx.dsn, min_size=size, max_size=size, init=jsonb)
    try:
        before = meter.read()
        latencies = await insert(pool, n, rows.__getitem__, "floor")
        cpu = meter.since(before)
    finally:
        await pool.close()
    return n / cpu.seconds, latencies, cpu


async def wrk_phase(
    server: Server, script: str, seconds: float, who: str = ""
) -> tuple[wrk.WrkRun, Cpu]:
    """wrk at concurrency 16 for `seconds`; every reply checked when `who` names the phase,
    and the server profiled meanwhile if asked."""
    spy = None
    if who and server.profile is not None:
        folded = server.profile / (re.sub(r"\W+", "-", who).strip("-") + ".folded")
        spy = py_spy(server.proc.pid, folded, seconds)
    before = server.meter.read()
    try:
        got = await asyncio.to_thread(wrk.run, server.origin, script, seconds, CONCURRENCY)
    finally:
        if spy is not None:
            await asyncio.to_thread(spy.wait, 120)
    cpu = server.meter.since(before, extra=got.cpu)
    if who and (got.bad or got.socket_errors):
        wrong = f"{got.bad} wrong replies and {got.socket_errors} socket errors"
        raise BenchError(f"{who}: {wrong} in {got.requests:,} requests; first: {got.sample}")
    return got, cpu


def post_script(server: Server, template: dict[str, Any], prefix: str) -> str:
    path = server.base.removeprefix(server.origin) + "/Users"
    return wrk.post_users_script(path, server.token, orjson.dumps(template), prefix)


async def post_users(ctx: Ctx) -> None:
    """(1) POST /Users at concurrency 16 by wrk, ours and the peer's; (7) the floor."""
    s, (_, ours), peer = ctx.sizes, ctx.http(), ctx.peer
    template = orjson.loads(entra_body(0, wrk.NAME)) | {"externalId": wrk.EXTERNAL_ID}
    err.print("POST /Users with wrk …")
    await wrk_phase(ours, post_script(ours, template, "Warm"), 2)
    script = post_script(ours, template, "Post")
    post, cpu = await wrk_phase(ours, script, s.post_seconds, "scimledger POST /Users")
    maker = await row_maker(ctx.dsn, ours.token)
    floor_rate, floor_lat, floor_cpu = await floor(ctx, maker)
    peer_post = None
    if peer is not None:
        err.print("POST /Users on the peer with wrk …")
        template.pop("manager", None)
        script = post_script(peer, template, "Post")
        peer_post, peer_cpu = await wrk_phase(peer, script, s.post_seconds, "scim2-server POST")
    to_floor = post.rate / floor_rate
    to_peer = post.rate / peer_post.rate if peer_post else None
    ok = to_floor >= 0.6 and (to_peer is None or to_peer >= 3)
    ctx.add(Row("1", f"POST /Users, concurrency {CONCURRENCY} (wrk)", f"{post.requests:,} requests",
        post.text(), peer_post.text() if peer_post else ctx.no_peer, "≥ 0.6 x floor and ≥ 3 x peer",
        f"{verdict(ok)}: {to_floor:.2f} x floor, "
        + (f"{to_peer:.1f} x peer" if to_peer else "no peer"), cpu.text()))  # fmt: skip
    ctx.add(Row("7", f"floor: the rows of (1) by plain asyncpg, concurrency {CONCURRENCY}",
        f"{s.floor_rows:,} users", f"{floor_rate:,.0f} users/s; p50"
        f" {ms(percentile(floor_lat, 50))}, p99 {ms(percentile(floor_lat, 99))}", "",
        "(1) ≥ 0.6 x this", f"service/floor = {to_floor:.2f}", floor_cpu.text()))  # fmt: skip
    if peer_post is not None:
        ctx.notes.append(
            f"(1) peer CPU: {peer_cpu.text()}; wrk used {post.cpu:.1f} CPU s against"
            f" scimledger's {cpu.server:.1f} s (server process) in the POST run"
        )
    ctx.notes.append(
        "(7) the floor: per user the two events and the scim_users row one POST commits, made"
        " beforehand by the service's code, in ONE statement, durable commit"
    )
    # Where (1) stands against (7) on this machine: the CPU each one costs per user.
    server_ms, pg_ms = (x / post.requests * 1000 for x in (cpu.server, cpu.postgres or 0.0))
    ours_ms, floor_pg_ms = server_ms + pg_ms, (floor_cpu.postgres or 0.0) / s.floor_rows * 1000
    floor_ms = floor_pg_ms + floor_cpu.client / s.floor_rows * 1000
    cores = os.cpu_count() or 1
    ceiling = cores / ours_ms * 1000
    ctx.notes.append(
        f"(1, 7) CPU per user created: scimledger {ours_ms:.2f} ms (server {server_ms:.2f} ms,"
        f" PostgreSQL {pg_ms:.2f} ms: its statement, the token lookup, and the audit and activity"
        f" projections' writes); the floor {floor_ms:.2f} ms (PostgreSQL {floor_pg_ms:.2f} ms, its"
        f" client the rest). With all {cores} cores on it, scimledger's cost allows at most"
        f" {ceiling:,.0f} POST/s, {ceiling / floor_rate:.2f} x the floor measured here"
    )
