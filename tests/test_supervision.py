"""`serve` supervises the embedded PostgreSQL: a killed postmaster comes back by itself, one that
cannot come back turns /healthz unhealthy, and a `serve` killed together with its postmaster
leaves nothing that stops the next one. Acknowledged writes survive all of it.

Real processes throughout: `scimledger serve` on an embedded data directory of the test's own,
its postmaster killed with SIGKILL. Each test ends with no PostgreSQL left on that directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_cli import SCIMLEDGER, free_port
from tests.test_entra_users import entra_user, headers
from tests.test_runner import eventually

# Generous bounds for a loaded 2-core machine; every wait polls and ends as soon as it can.
START = 120.0
RECOVER = 90.0


class Serve:
    """One `scimledger serve` on `data_dir` (no DATABASE_URL: the embedded server)."""

    def __init__(self, data_dir: Path, logs: Path) -> None:
        self.data_dir = data_dir
        self.pgdata = (data_dir / "pg").resolve()
        self.out = logs / "serve.out"
        self.err = logs / "serve.err"
        self.proc: asyncio.subprocess.Process | None = None
        self.base = ""
        self.starts = 0

    async def start(self, *args: str) -> None:
        self.starts += 1
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env["SCIMLEDGER_RATE_LIMIT"] = "0"  # the writers below retry 503s quickly
        with self.out.open("ab") as out, self.err.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                SCIMLEDGER,
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(self.data_dir),
                *args,
                stdout=out,
                stderr=err,
                env=env,
            )
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.proc.returncode is None, self.err.read_text()[-3000:]
                try:
                    async with http.get(f"{self.base}/readyz") as r:
                        if r.status == 200 and self.banners() == self.starts:
                            return
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "serve never became ready"
                await asyncio.sleep(0.1)

    def banners(self) -> int:
        """The banner comes last (under --workers, once every worker listens)."""
        out = self.out.read_text()
        return out.count("Created tenant 'default'") + out.count("Serving SCIM at")

    def token(self) -> str:
        return self.out.read_text().split("Secret Token:")[1].split()[0]

    def postmaster(self) -> int:
        return int((self.pgdata / "postmaster.pid").read_text().split()[0])

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.err.read_text().splitlines():
            if line.startswith("{"):
                events.append(orjson.loads(line))
        return events

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout=60)


def postgres_on(pgdata: Path) -> list[psutil.Process]:
    """This data directory's postmaster, if one runs (other test runs have theirs)."""
    found = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        if (
            p.info["name"] == "postgres"
            and str(pgdata) in (p.info["cmdline"] or [])
            and p.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(p)
    return found


async def none_left(pgdata: Path) -> bool:
    return not postgres_on(pgdata)


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    # Not under tmp_path: a pytest session starting meanwhile (another run on this machine)
    # makes /tmp/pytest-of-USER private again, and PostgreSQL's own user could not start there.
    data_dir = Path(tempfile.mkdtemp(prefix="scimledger-supervision-"))
    server = Serve(data_dir / "var", tmp_path)
    try:
        yield server
    finally:
        # Whatever the test did, leave no process behind.
        if server.proc is not None and server.proc.returncode is None:
            server.proc.kill()
            await server.proc.wait()
        for p in postgres_on(server.pgdata):
            p.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


async def metric(http: aiohttp.ClientSession, base: str, name: str) -> float | None:
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


class Writers:
    """Clients creating users without pause; `acked` holds every user answered 201."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.auth = {"Authorization": f"Bearer {token}"}
        self.acked: list[str] = []
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, http: aiohttp.ClientSession, count: int) -> None:
        self.tasks = [asyncio.create_task(self._write(http, w)) for w in range(count)]

    async def _write(self, http: aiohttp.ClientSession, w: int) -> None:
        k = 0
        while not self.stopping.is_set():
            k += 1
            body = entra_user(f"w{w}-{k}@contoso.com")
            try:
                async with http.post(
                    f"{self.base}/scim/v2/Users", json=body, headers=headers(self.auth)
                ) as r:
                    if r.status == 201:
                        self.acked.append((await r.json(content_type=None))["id"])
                        continue
                    assert r.status == 503, (r.status, await r.text())
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)

    async def until(self, acks: int) -> None:
        async def enough() -> bool:
            return len(self.acked) >= acks

        await eventually(enough, within=RECOVER)

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.gather(*self.tasks)

    async def all_readable(self, http: aiohttp.ClientSession) -> None:
        for uid in self.acked:
            async with http.get(f"{self.base}/scim/v2/Users/{uid}", headers=self.auth) as r:
                assert r.status == 200, uid


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_killed_postmaster_is_restarted_and_the_service_recovers(
    serve: Serve, workers: str
) -> None:
    await serve.start("--workers", workers)
    first = serve.postmaster()
    timeout = aiohttp.ClientTimeout(total=30)
    # A new connection each time: with two workers, both serve (and scrape) in turn.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        writers = Writers(serve.base, serve.token())
        writers.start(http, 4)
        await writers.until(40)
        before = len(writers.acked)
        os.kill(first, signal.SIGKILL)  # the OOM killer's way: every write in flight
        # The service comes back by itself: writes are acknowledged again.
        await writers.until(before + 40)
        await writers.stop()
        await writers.all_readable(http)  # every acknowledged write, before and after

        assert serve.postmaster() != first
        for _ in range(4):
            restarts = await metric(http, serve.base, "scimledger_embedded_postgres_restarts_total")
            assert restarts == 1.0
            async with http.get(f"{serve.base}/healthz") as r:
                assert r.status == 200
    # The log stays one JSON object a line throughout: no traceback, from us or asyncpg.
    assert "Traceback" not in serve.err.read_text()
    restarted = [e for e in serve.log_events() if e["event"] == "embedded PostgreSQL restarted"]
    assert len(restarted) == 1 and restarted[0]["pid"] == serve.postmaster()
    assert await serve.stop() == 0
    # The last process to leave stops the restarted server too.
    await eventually(lambda: none_left(serve.pgdata), within=60)


async def test_a_postmaster_that_cannot_restart_makes_healthz_unhealthy(serve: Serve) -> None:
    await serve.start("--workers", "2")
    conf = serve.pgdata / "postgresql.conf"
    good = conf.read_text()
    conf.write_text(good + "\nmax_connections = 'plenty'\n")  # the next start fails
    os.kill(serve.postmaster(), signal.SIGKILL)
    connector = aiohttp.TCPConnector(force_close=True)  # both workers answer in turn
    async with aiohttp.ClientSession(connector=connector) as http:

        async def health(expected: int) -> bool:
            statuses = set()
            for _ in range(4):
                async with http.get(f"{serve.base}/healthz") as r:
                    statuses.add(r.status)
                    if r.status == 503:
                        assert await r.json() == {
                            "status": "unhealthy",
                            "error": "the embedded PostgreSQL cannot be restarted",
                        }
            return statuses == {expected}

        await eventually(lambda: health(503), within=RECOVER)
        failed = await metric(
            http, serve.base, "scimledger_embedded_postgres_failed_restarts_total"
        )
        assert failed is not None and failed >= 3
        failures = [
            e for e in serve.log_events() if e["event"] == "embedded PostgreSQL did not restart"
        ]
        assert f'FATAL:  configuration file "{conf}" contains errors' in failures[-1]["error"]

        # The supervisor keeps trying: once the directory is usable again, all is well again.
        conf.write_text(good)
        await eventually(lambda: health(200), within=RECOVER)
        assert await metric(http, serve.base, "scimledger_embedded_postgres_restarts_total") == 1
    assert await serve.stop() == 0
    await eventually(lambda: none_left(serve.pgdata), within=60)


def _zombie() -> tuple[int, subprocess.Popen[bytes]]:
    """A process entry that lingers after its process ended (not reaped until waited for)."""
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return child.pid, child


@pytest.mark.parametrize("stale", ["dead postmaster", "another process", "zombie"])
async def test_serve_starts_after_it_and_its_postmaster_were_killed_together(
    serve: Serve, stale: str
) -> None:
    await serve.start("--workers", "1")  # one process: the SIGKILL takes the whole service
    async with aiohttp.ClientSession() as http:
        writers = Writers(serve.base, serve.token())
        writers.start(http, 2)
        await writers.until(20)
        postmaster = psutil.Process(serve.postmaster())
        assert serve.proc is not None
        serve.proc.kill()
        postmaster.kill()
        await writers.stop()
    await serve.proc.wait()

    async def postmaster_reaped() -> bool:
        return not psutil.pid_exists(postmaster.pid)

    await eventually(postmaster_reaped, within=60)

    # What the killed postmaster left names a pid that is not PostgreSQL: dead, some other
    # process that got the pid, or a zombie nobody reaps. Both of its lock files say so.
    held: subprocess.Popen[bytes] | None = None
    if stale == "another process":
        held = await asyncio.to_thread(subprocess.Popen, ["sleep", "600"])
        pid = held.pid
    elif stale == "zombie":
        pid, held = await asyncio.to_thread(_zombie)
    else:
        pid = postmaster.pid
    try:
        pidfile = serve.pgdata / "postmaster.pid"
        lines = pidfile.read_text().splitlines()
        socket_lock = Path(lines[4]) / f".s.PGSQL.{lines[3]}.lock"
        for lock in (pidfile, socket_lock):
            lock.write_text("\n".join([str(pid), *lock.read_text().splitlines()[1:]]) + "\n")

        await serve.start()
        writers.base = serve.base
        async with aiohttp.ClientSession() as http:
            await writers.all_readable(http)  # nothing acknowledged was lost
            body = entra_user("after@contoso.com")
            async with http.post(
                f"{serve.base}/scim/v2/Users", json=body, headers=headers(writers.auth)
            ) as r:
                assert r.status == 201
        assert await serve.stop() == 0
        # The killed serve never detached; the new one, the last to leave, stops the server.
        await eventually(lambda: none_left(serve.pgdata), within=60)
    finally:
        if held is not None:
            held.kill()
            held.wait()
