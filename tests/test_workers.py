"""`scimledger serve --workers N`: processes sharing a port, metrics summed, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import uuid

import aiohttp
import asyncpg
import orjson
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.test_cli import _serve, _stop, _token, free_port, run
from tests.test_entra_users import entra_user
from tests.test_runner import eventually


def children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def spawned(pid: int) -> list[psutil.Process]:
    """The processes `serve` spawned (not multiprocessing's resource tracker), zombies left out."""
    out = []
    for p in children(pid):
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def is_bulk(p: psutil.Process) -> bool:
    """The bulk process (service/bulk.py): the one listening on the bulk Unix socket."""
    try:
        return any("scimledger-bulk-" in str(c.laddr) for c in p.net_connections(kind="unix"))
    except psutil.Error:
        return False


def workers_of(pid: int) -> list[psutil.Process]:
    """The worker processes serving the port (the bulk process left out)."""
    return [p for p in spawned(pid) if not is_bulk(p)]


def bulk_of(pid: int) -> list[psutil.Process]:
    return [p for p in spawned(pid) if is_bulk(p)]


def gone(procs: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


async def requests_counted(http: aiohttp.ClientSession, port: int, route: str) -> float:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "scimledger_http_requests_total" and s.labels["route"] == route:
                return float(s.value)
    return 0.0


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


async def test_workers_share_the_port_and_metrics_and_drain_on_sigterm(fresh_dsn: str) -> None:
    proc, banner, port = await _serve("--workers", "2", "--database-url", fresh_dsn)
    blocker = await asyncpg.connect(fresh_dsn)
    everything = children(proc.pid)
    try:
        workers = workers_of(proc.pid)
        assert len(workers) == 2
        auth = {"Authorization": f"Bearer {_token(banner)}"}
        url = f"http://127.0.0.1:{port}/scim/v2/ServiceProviderConfig"
        # A new connection each time: the kernel spreads them over both workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(20):
                async with http.get(url, headers=auth) as r:
                    assert r.status == 200
            # Whichever worker answers the scrape, it reports both workers' requests.
            for _ in range(6):
                assert await requests_counted(http, port, "/scim/v2/ServiceProviderConfig") == 20

            # A worker that dies is replaced; the service keeps answering.
            workers[0].kill()

            async def replaced() -> bool:
                now = workers_of(proc.pid)
                return len(now) == 2 and workers[0].pid not in {p.pid for p in now}

            await eventually(replaced)
            everything = children(proc.pid) + workers
            for _ in range(10):
                async with http.get(url, headers=auth) as r:
                    assert r.status == 200

            # SIGTERM with a request in flight. Hold the users view still: the POST appends
            # its events, then waits to write its row.
            blocked = blocker.transaction()
            await blocked.start()
            await blocker.execute("LOCK TABLE scim_users IN SHARE MODE")
            post = asyncio.create_task(
                http.post(
                    f"http://127.0.0.1:{port}/scim/v2/Users",
                    data=orjson.dumps(entra_user("in.flight@contoso.com")),
                    headers={
                        **auth,
                        "Content-Type": "application/scim+json",
                    },
                )
            )

            async def request_waits_in_the_database() -> bool:
                return bool(
                    await blocker.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND application_name LIKE 'scimledger:%'"
                        " AND datname = current_database()"
                    )
                )

            await eventually(request_waits_in_the_database)
            proc.send_signal(signal.SIGTERM)

            async def stopped_accepting() -> bool:
                return await refused(port)

            await eventually(stopped_accepting)  # shutting down, the request still in flight
            await blocked.rollback()
            response = await asyncio.wait_for(post, 60)
            assert response.status == 201, await response.text()
            created = await response.json(content_type=None)
            request_id = response.headers["X-Request-Id"]
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        await eventually(lambda: asyncio.sleep(0, gone(everything)))
        # The write the client was told about is stored: its row, its events, its record.
        assert (
            await blocker.fetchval(
                "SELECT user_name FROM scim_users WHERE id = $1", uuid.UUID(created["id"])
            )
            == "in.flight@contoso.com"
        )
        topics = [
            r["topic"]
            for r in await blocker.fetch(
                "SELECT topic FROM stored_events WHERE request_id = $1", request_id
            )
        ]
        assert any("UserProvisioned" in t for t in topics)
        assert any(t.startswith("domain.request:") for t in topics)
        # Nothing of ours is still connected to the database.
        left = await blocker.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'scimledger:%'"
        )
        assert left == 0
    finally:
        await blocker.close()
        if proc.returncode is None:
            await _stop(proc)


async def test_a_taken_port_exits_1_with_one_line(fresh_dsn: str) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        code, _out, err = await run(
            "serve", "--workers", "2", "--port", str(port), "--database-url", fresh_dsn
        )
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"scimledger: error: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in last.lower()
    assert "Traceback" not in err
