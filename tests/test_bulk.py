"""Large bodies are served by a process of their own (service/bulk.py), run as `serve` runs it."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import psutil

from projections.registry import PROJECTIONS
from projections.runner import LOCK_NAMESPACE
from service.feeds import streams
from service.feeds.producer import FEEDS_LOCK_NAMESPACE as FEEDS
from service.feeds.sets import CREATE
from service.limits_cpu import BULK_NICENESS
from tests.test_cli import _serve as serve
from tests.test_cli import _stop, _token
from tests.test_entra_users import entra_user
from tests.test_runner import eventually
from tests.test_workers import bulk_of, workers_of

THRESHOLD = 2048  # SCIMLEDGER_BULK_BODY_BYTES for these tests: a small user stays, a big one goes
MAX_BODY = 64 * 1024


async def _serve(dsn: str) -> tuple[asyncio.subprocess.Process, str, int]:
    env = {"SCIMLEDGER_BULK_BODY_BYTES": str(THRESHOLD), "SCIMLEDGER_MAX_BODY_BYTES": str(MAX_BODY)}
    return await serve("--workers", "1", "--database-url", dsn, env=env)


def _big_user(user_name: str) -> bytes:
    """A user whose body is past THRESHOLD: Entra's shape, with many work e-mail addresses."""
    body = entra_user(user_name)
    body["emails"] = [{"type": "work", "value": f"alias{i}.{user_name}"} for i in range(60)]
    raw = orjson.dumps(body)
    assert THRESHOLD < len(raw) < MAX_BODY
    return raw


async def _chunks(raw: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(raw), 1000):
        yield raw[start : start + 1000]


async def _posted(http: aiohttp.ClientSession, port: int) -> dict[str, int]:
    """POST /scim/v2/Users requests counted in /metrics, by status; and their durations."""
    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    counts: dict[str, int] = {}
    prefix = 'scimledger_http_requests_total{method="POST",route="/scim/v2/Users",status="'
    for line in text.splitlines():
        if line.startswith(prefix):
            counts[line[len(prefix) : line.index('"', len(prefix))]] = int(float(line.split()[-1]))
    timed = 'scimledger_http_request_duration_seconds_count{method="POST",route="/scim/v2/Users"}'
    [duration] = [line for line in text.splitlines() if line.startswith(timed)]
    assert int(float(duration.split()[-1])) == sum(counts.values())
    return counts


# Whether the feeds' producer leads from the process of this application_name (and none other).
_FEEDS_LEADER = """
    SELECT array_agg(a.application_name) = ARRAY[$2] FROM pg_locks l
    JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1"""


async def _behind_everyone(db: asyncpg.Connection, front: int, bulk: psutil.Process) -> None:
    """The asynchronous projections' runners lead from the bulk process, not the front; the
    bulk process runs in a session (an autogroup) of its own, and it and its PostgreSQL
    backends at a lower priority."""
    leaders = """
        SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1"""

    async def runners_lead() -> bool:
        return len(await db.fetch(leaders, LOCK_NAMESPACE)) == sum(
            p.mode == "async" for p in PROJECTIONS.values()
        )

    await eventually(runners_lead)
    assert {r[0] for r in await db.fetch(leaders, LOCK_NAMESPACE)} == {f"scimledger:{bulk.pid}"}
    # So does the feeds' producer (and its pusher): their CPU is not the front's.
    await eventually(lambda: _count(db, _FEEDS_LEADER, FEEDS, f"scimledger:{bulk.pid}"))
    # Both POSTs are in the provisioning log: the runners fold what either process wrote.
    await eventually(lambda: _count(db, "SELECT count(*) >= 2 FROM audit_entries"))
    assert os.getsid(bulk.pid) == bulk.pid != os.getsid(front)
    assert bulk.nice() == BULK_NICENESS and psutil.Process(front).nice() == 0
    autogroup = Path(f"/proc/{bulk.pid}/autogroup")  # Linux with CONFIG_SCHED_AUTOGROUP
    if autogroup.exists():  # noqa: ASYNC240 (procfs: no I/O wait)
        # Back at BULK_NICENESS once it serves no request (service/limits_cpu.py).
        weight = lambda: autogroup.read_text().split()[-1] == str(BULK_NICENESS)  # noqa: E731
        await eventually(lambda: asyncio.sleep(0, weight()))
    backends = await db.fetch(
        "SELECT pid, application_name FROM pg_stat_activity WHERE application_name IN ($1, $2)",
        f"scimledger:{bulk.pid}",
        f"scimledger:{front}",
    )
    niceness = {(r[1], psutil.Process(r[0]).nice()) for r in backends}
    assert niceness == {(f"scimledger:{bulk.pid}", BULK_NICENESS), (f"scimledger:{front}", 0)}


async def _count(db: asyncpg.Connection, sql: str, *args: object) -> bool:
    return bool(await db.fetchval(sql, *args))


async def _polled(
    http: aiohttp.ClientSession, base: str, headers: dict[str, str], db: asyncpg.Connection
) -> None:
    """A poll stream served by the front while the bulk process produces its SETs: a write
    after the stream's creation reaches a waiting long poll (the producer is woken through
    PostgreSQL; the front's long poll sees the stored SETs at its next check)."""
    made = await streams.create(
        db, tenant="default", name="polled", endpoint=None,
        events=streams.parse_events(None), full=False, scope_group=None,
    )  # fmt: skip
    url = base.removesuffix("/scim/v2") + f"/events/{made['id']}"
    feed = {"Authorization": f"Bearer {made['token']}"}
    async with http.post(url, json={"returnImmediately": True}, headers=feed) as r:
        assert r.status == 200 and (await r.json())["sets"] == {}

    async def write() -> None:
        await asyncio.sleep(0.5)  # the poll below is waiting by then
        raw = orjson.dumps(entra_user("followed@contoso.com"))
        async with http.post(f"{base}/Users", data=raw, headers=headers) as r:
            assert r.status == 201, await r.text()

    writing = asyncio.create_task(write())
    async with http.post(url, json={}, headers=feed) as r:  # a long poll
        assert r.status == 200
        tokens = list((await r.json())["sets"].values())
    await writing
    assert len(tokens) == 1
    payload = orjson.loads(base64.urlsafe_b64decode(tokens[0].split(".")[1] + "=="))
    assert list(payload["events"]) == [f"{CREATE}:notice"]


async def test_large_bodies_are_served_by_the_bulk_process(fresh_dsn: str) -> None:
    proc, banner, port = await _serve(fresh_dsn)
    base = f"http://127.0.0.1:{port}/scim/v2"
    headers = {
        "Authorization": f"Bearer {_token(banner)}",
        "Content-Type": "application/scim+json",
    }
    db = await asyncpg.connect(fresh_dsn)
    try:
        assert workers_of(proc.pid) == []  # one process serving: `serve` itself
        [bulk] = bulk_of(proc.pid)
        async with aiohttp.ClientSession() as http:
            # A small body is served where it arrived; a large one by the bulk process. Both
            # are stored with the same record, the client's address included.
            created = {}
            for name, raw in (
                ("small@contoso.com", orjson.dumps(entra_user("small@contoso.com"))),
                ("large@contoso.com", _big_user("large@contoso.com")),
            ):
                async with http.post(f"{base}/Users", data=raw, headers=headers) as r:
                    assert r.status == 201, await r.text()
                    assert r.headers["Content-Type"].startswith("application/scim+json")
                    assert r.headers["Location"].startswith(f"{base}/Users/")
                    assert "X-Request-Id" in r.headers, (name, dict(r.headers))
                    created[name] = (await r.json(content_type=None), r.headers["X-Request-Id"])
            assert len(created["large@contoso.com"][0]["emails"]) == 60
            await _behind_everyone(db, proc.pid, bulk)
            # The bulk process keeps its figures in its memory; the front's /metrics adds them.
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
            for projection in ("activity", "audit"):
                active = f'scimledger_projection_runner_active{{projection="{projection}"}} 1.0'
                assert active in text.splitlines()
            # Both are counted in /metrics, under the same names (the relayed one by the front).
            assert await _posted(http, port) == {"201": 2}
            for _, request_id in created.values():
                record = await db.fetchval(
                    "SELECT state FROM stored_events WHERE request_id = $1"
                    " AND topic LIKE 'domain.request:%'",
                    request_id,
                )
                assert record is not None and b'"127.0.0.1"' in bytes(record)

            # A body of unknown length (chunked) goes there too, and past the limit it is a 413.
            chunked = _big_user("chunked@contoso.com")
            async with http.post(f"{base}/Users", data=_chunks(chunked), headers=headers) as r:
                assert r.status == 201, await r.text()
            too_big = orjson.dumps({**entra_user("huge@contoso.com"), "nickName": "x" * MAX_BODY})
            async with http.post(f"{base}/Users", data=_chunks(too_big), headers=headers) as r:
                assert r.status == 413, await r.text()
                assert (await r.json(content_type=None))["status"] == "413"
            async with http.post(f"{base}/Users", data=too_big, headers=headers) as r:
                assert r.status == 413  # announced as too large: refused where it arrived

            # Bad input through the bulk process is the same SCIM error, and writes nothing.
            bad = _big_user("bad@contoso.com").replace(b'"active":true', b'"active":"sometimes"')
            async with http.post(f"{base}/Users", data=bad, headers=headers) as r:
                assert r.status == 400, await r.text()
                assert (await r.json(content_type=None))["scimType"] == "invalidValue"
            assert await _posted(http, port) == {"201": 3, "413": 2, "400": 1}

            # The bulk process dies: large bodies get 503 with Retry-After (never a 500) until
            # `serve` has started another; small ones are answered all along.
            bulk.kill()
            await asyncio.to_thread(bulk.wait, 10)
            statuses = set()

            async def answered_again() -> bool:
                name = f"again{len(statuses)}@contoso.com"
                async with http.post(f"{base}/Users", data=_big_user(name), headers=headers) as r:
                    statuses.add(r.status)
                    if r.status == 503:
                        assert r.headers["Retry-After"] == "1"
                    async with http.get(f"{base}/Users?count=1", headers=headers) as small:
                        assert small.status == 200
                    return r.status == 201

            await eventually(answered_again)
            assert statuses <= {201, 503}
            [replaced] = bulk_of(proc.pid)
            assert replaced.pid != bulk.pid
            # The feeds' producer leads from the new bulk process; a poll on the front gets
            # what it produces.
            await eventually(lambda: _count(db, _FEEDS_LEADER, FEEDS, f"scimledger:{replaced.pid}"))
            await _polled(http, base, headers, db)
        users = await db.fetchval("SELECT count(*) FROM scim_users")
        assert users == 5  # small, large, chunked, the first one answered again, followed
    finally:
        await db.close()
        everything = psutil.Process(proc.pid).children(recursive=True)
        assert await _stop(proc) == 0
        await eventually(lambda: asyncio.sleep(0, not any(p.is_running() for p in everything)))
    assert proc.stderr is not None
    lines = [orjson.loads(line) for line in (await proc.stderr.read()).splitlines()]
    served = [(line.get("process"), line["path"]) for line in lines if line["event"] == "request"]
    assert (None, "/scim/v2/Users") in served  # the small POST, where it arrived
    assert ("bulk", "/scim/v2/Users") in served  # the large ones
    # One line per request: the front's scrape of the bulk process's figures writes none.
    assert ("bulk", "/metrics") not in served and (None, "/metrics") in served
