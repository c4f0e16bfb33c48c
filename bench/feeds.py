"""Row (10), SCIM event feeds: a poll stream's catch-up from the start to a poll consumer
(signed SETs/s), and POST /Users per second with two active streams (poll + push) against
none, rounds alternating. Its sizes: `--set feeds=EVENTS,REQUESTS,ROUNDS` (bench/table.py)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
import uuid
from functools import partial
from typing import Any

import aiohttp
import orjson
import psutil
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.common import Scim, client_cpu, drain, make_database, process_cpu, tree_cpu
from bench.table import Ctx, Row, median, verdict
from domain.user import User
from infra.config import Settings
from infra.database import Database, create_pool
from infra.eventstore import Conn, EventStore
from infra.tenants import create_tenant
from service import bulk
from service.app import create_app
from service.feeds import streams
from service.feeds.config import FEED_SETTINGS
from service.feeds.producer import FEED_CHANNEL, PRODUCER, Producer

USER = "urn:ietf:params:scim:schemas:core:2.0:User"


async def _fill(db: Database, conn: Conn, tenant_id: uuid.UUID, n: int) -> None:
    """n UserProvisioned events, 1000 to a transaction, sealed as the service stores them."""
    for start in range(0, n, 1000):
        users = [{"userName": f"u{i}@contoso.com"} for i in range(start, min(n, start + 1000))]
        made = [User.provision(uuid.uuid4(), tenant_id, u | {"displayName": "U"}) for u in users]
        await db.store.append(conn, tenant_id, [e for u in made for e in u.collect_events()])
    # As a log that has been there a while: vacuumed and analysed (the autovacuum that a
    # million fresh rows set off is not the catch-up's cost).
    await conn.execute("VACUUM ANALYZE stored_events")


class Meter:
    """CPU seconds so far of each part of a catch-up: this process (the producer and the poll
    endpoint), its signer processes (service/feeds/signing.py), the poll consumer's process
    and PostgreSQL (when it runs here)."""

    def __init__(self, postmaster: psutil.Process | None) -> None:
        self.postmaster = postmaster
        self.consumer: psutil.Process | None = None
        self._gone: dict[int, float] = {}  # last seen CPU of children, kept when they exit

    def sample(self) -> dict[str, float]:
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                self._gone[child.pid] = process_cpu(child)
        consumer = self._gone.get(self.consumer.pid, 0.0) if self.consumer else 0.0
        return {
            "producer": client_cpu(),
            "signers": sum(self._gone.values()) - consumer,
            "consumer": consumer,
            "postgres": tree_cpu(self.postmaster) if self.postmaster else 0.0,
        }


async def _stream(
    conn: Conn, tenant: str, name: str, endpoint: str | None, from_start: bool = False
) -> dict[str, Any]:
    """A notice-form stream of every event (a poll stream if `endpoint` is None)."""
    events = streams.parse_events(None)
    return await streams.create(
        conn, tenant=tenant, name=name, endpoint=endpoint, events=events, full=False,
        scope_group=None, from_start=from_start,
    )  # fmt: skip


def _poller(url: str, token: str, stop: Any, most: int) -> None:
    """A poll consumer (RFC 8936), in a process of its own like a real one: long polls of
    `most` SETs, each acknowledging what the last one gave."""

    async def go() -> None:
        acks: list[str] = []
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                body = orjson.dumps({"ack": acks, "maxEvents": most, "returnImmediately": False})
                async with session.post(url, data=body, headers=headers) as r:
                    acks = list(orjson.loads(await r.read())["sets"])

    asyncio.run(go())


async def polled_catch_up(dsn: str, n: int, meter: Meter) -> tuple[float, float]:
    """End to end: the producer as the service runs it (its own task, woken by commits and
    acknowledgements) and the poll endpoint serve a consumer in another process, from a new
    stream's creation until the consumer has acknowledged `n` SETs. SETs/s, and CPU seconds
    per SET (producer and server, signers, consumer and PostgreSQL)."""
    pool = await create_pool(dsn, min_size=2, max_size=10)
    db = Database(dsn=dsn, pool=pool, store=EventStore(pool), embedded=None)
    settings = Settings(database_url=dsn, rate_limit=0, run_projections=False)
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    app = create_app(settings, db)
    producer = Producer(db, lambda: "http://127.0.0.1:8000/scim/v2", standby_interval=0.1)
    app[PRODUCER] = producer
    halt = asyncio.Event()
    consumer = None
    wait, FEED_SETTINGS.max_wait = FEED_SETTINGS.max_wait, 1.0  # the consumer's last long poll
    try:
        async with pool.acquire() as conn:
            issued = await create_tenant(conn, f"polled-{uuid.uuid4().hex[:6]}")
            await _fill(db, conn, issued.tenant_id, n)
        running = asyncio.ensure_future(producer.run(halt))
        async with TestServer(app, host="127.0.0.1") as server:
            before = meter.sample()
            started = time.perf_counter()
            async with pool.acquire() as conn:
                made = await _stream(conn, issued.tenant, "replay", None, True)
                await conn.execute("SELECT pg_notify($1, '')", FEED_CHANNEL)
            url = str(server.make_url(f"/events/{made['id']}"))
            consumer = spawn.Process(target=_poller, args=(url, made["token"], stop, 1000))
            consumer.start()
            meter.consumer = psutil.Process(consumer.pid)
            sql = "SELECT coalesce((SELECT delivered FROM feed_delivered WHERE stream_id = $1), 0)"
            delivered = 0
            while delivered < n:
                await asyncio.sleep(0.05)
                delivered = await pool.fetchval(sql, uuid.UUID(made["id"]))
            elapsed = time.perf_counter() - started
            after = meter.sample()
            parts = {k: (after[k] - before[k]) * 1e6 / n for k in before}  # µs per SET
            stop.set()
            await asyncio.to_thread(consumer.join, 10)
        halt.set()
        await running
    finally:
        stop.set()
        halt.set()
        if consumer is not None and consumer.is_alive():
            consumer.terminate()
        FEED_SETTINGS.max_wait = wait
        await pool.close()
    total = sum(parts.values())
    each = ", ".join(f"{k} {v:,.0f}" for k, v in parts.items() if v >= 0.5)
    print(
        f"polled catch-up: {n / elapsed:,.0f} SETs/s, {total:,.0f} µs CPU/SET ({each});"
        f" producer held by a full outbox {producer.held} times"
    )
    return n / elapsed, total / 1e6


async def _writes(base: str, token: str, requests: int, concurrency: int) -> float:
    """POST /Users per second, `concurrency` at a time."""
    async with aiohttp.ClientSession() as session:
        scim = Scim(session, f"{base}/scim/v2", token)

        async def post(_: int) -> None:
            name = f"{uuid.uuid4().hex}@contoso.com"
            body = {"schemas": [USER], "userName": name, "active": True}
            await scim.send("POST", "/Users", orjson.dumps(body), (201,))

        started = time.perf_counter()
        await drain(range(requests), post, concurrency)
        return requests / (time.perf_counter() - started)


def _receiver(ports: Any, stop: Any) -> None:
    """A push receiver (RFC 8935: 202 for each SET), in its own process like a real one."""

    async def go() -> None:
        async def receive(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(status=202)

        app = web.Application()
        app.router.add_post("/set", receive)
        async with TestServer(app, host="127.0.0.1") as server:
            ports.put(server.port)
            await asyncio.to_thread(stop.wait)

    asyncio.run(go())


async def with_streams(dsn: str, requests: int, rounds: int) -> tuple[float, float]:
    """POST /Users per second with the two streams paused and active, rounds alternating. The
    receiver and the poll consumer run in processes of their own (as they would elsewhere);
    the app is `serve`'s: this process is its front (sharing it with the load client), and
    a bulk process (service/bulk.py) runs what `serve` gives it (the runners; the feeds'
    producer and pusher where the code puts them)."""
    os.environ["SCIMLEDGER_FEED_ALLOW_PRIVATE"] = "1"
    pool = await create_pool(dsn, min_size=2, max_size=20)
    db = Database(dsn=dsn, pool=pool, store=EventStore(pool), embedded=None)
    settings = Settings(database_url=dsn, rate_limit=0, max_concurrent_per_token=0)
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    ports = spawn.Queue()
    receiver = spawn.Process(target=_receiver, args=(ports, stop), daemon=True)
    receiver.start()
    processes = [receiver]
    none: list[float] = []  # POST/s with the streams paused
    two: list[float] = []  # and active
    try:
        port = await asyncio.to_thread(ports.get, True, 60)
        app = create_app(settings, db, role="process")
        app.cleanup_ctx.append(partial(bulk.serving_bulk, dsn=dsn, supervisor=None))
        async with TestServer(app, host="127.0.0.1") as server:
            async with pool.acquire() as conn:
                issued = await create_tenant(conn, f"writes-{uuid.uuid4().hex[:6]}")
                polled = await _stream(conn, issued.tenant, "poll", None)
                await _stream(conn, issued.tenant, "push", f"http://127.0.0.1:{port}/set")
            base = str(server.make_url("")).rstrip("/")
            args = (f"{base}/events/{polled['id']}", polled["token"], stop, 500)
            poller = spawn.Process(target=_poller, args=args, daemon=True)
            poller.start()
            processes.append(poller)
            await _writes(base, issued.token, requests // 4, 16)  # warm up
            for _ in range(rounds):
                for active, samples in ((False, none), (True, two)):
                    async with pool.acquire() as conn:
                        for name in ("poll", "push"):
                            await streams.set_paused(conn, issued.tenant, name, not active)
                    samples.append(await _writes(base, issued.token, requests, 16))
            stop.set()
            # the poller's last long poll ends when its stream is paused or at max_wait
            await asyncio.to_thread(poller.join, 5)
    finally:
        stop.set()
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.terminate()
        await pool.close()
    return median(none), median(two)


async def feeds(ctx: Ctx) -> None:
    """(10) the catch-up of a poll stream from the start, and the writes with two streams."""
    target = await make_database(ctx.dsn, "bench_feeds", migrated=True)
    events, requests, rounds = ctx.sizes.feeds
    rate, per_set = await polled_catch_up(target, events, Meter(ctx.postmaster))
    none, two = await with_streams(target, requests, rounds)
    met = two / none >= 0.9 and rate >= 20_000
    ctx.add(Row("10", "SCIM event feeds (bench.feeds): POST /Users with two active streams (poll"
        " + push to a local receiver) against none; a notice-form poll stream's catch-up from"
        " the start (CPU: producer, signers, consumer and PostgreSQL)",
        f"{events:,} events", f"writes {two:,.0f}/s vs {none:,.0f}/s = {two / none:.2f};"
        f" catch-up {rate:,.0f} SETs/s ({per_set * 1e6:,.0f} µs CPU per SET)", "",
        "≥ 0.90 of none; ≥ 20,000 SETs/s", verdict(met)))  # fmt: skip
