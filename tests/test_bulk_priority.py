"""The bulk process runs further behind everyone while it serves requests, and comes back to
its usual weight once idle, for its projection runners; it and its backends keep to their
CPUs (service/limits_cpu.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from service.limits_cpu import BULK_NICENESS, SERVING_NICENESS, bulk_cpu_set, cpu_list
from tests.test_bulk import _serve
from tests.test_cli import _serve as serve
from tests.test_cli import _stop, _token, run
from tests.test_entra_users import entra_user
from tests.test_runner import eventually
from tests.test_workers import bulk_of


def _weight(pid: int) -> str:
    return Path(f"/proc/{pid}/autogroup").read_text().split()[-1]


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="no autogroup here")
async def test_the_bulk_process_weighs_less_while_it_serves_a_request(fresh_dsn: str) -> None:
    proc, banner, port = await _serve(fresh_dsn)
    headers = {"Authorization": f"Bearer {_token(banner)}"}
    headers["Content-Type"] = "application/scim+json"
    try:
        [bulk] = bulk_of(proc.pid)
        await eventually(lambda: asyncio.sleep(0, _weight(bulk.pid) == str(BULK_NICENESS)))
        body = orjson.dumps(entra_user("slow@contoso.com"))
        sent_half, finish = asyncio.Event(), asyncio.Event()

        async def slowly() -> AsyncIterator[bytes]:
            # Chunked, so the front relays it to the bulk process as it comes.
            yield body[: len(body) // 2]
            sent_half.set()
            await finish.wait()
            yield body[len(body) // 2 :]

        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/scim/v2/Users"
            post = asyncio.create_task(http.post(url, data=slowly(), headers=headers))
            await sent_half.wait()
            # In flight in the bulk process: its session's weight is the lower one.
            await eventually(lambda: asyncio.sleep(0, _weight(bulk.pid) == str(SERVING_NICENESS)))
            finish.set()
            async with await post as r:
                assert r.status == 201, await r.text()
            # Idle again: back to its usual weight, within about a second.
            await eventually(lambda: asyncio.sleep(0, _weight(bulk.pid) == str(BULK_NICENESS)))
    finally:
        assert await _stop(proc) == 0


def _cpus_of(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(
        line.split()[-1] for line in status.splitlines() if line.startswith("Cpus_allowed_list")
    )


def test_bulk_cpu_lists() -> None:
    four = range(4)
    assert bulk_cpu_set("auto", [0]) is None  # one CPU: nothing to set apart
    assert bulk_cpu_set("auto", [0, 1]) == {1}
    assert bulk_cpu_set(" AUTO ", four) == {3}
    assert bulk_cpu_set("auto", [0, 2, 5, 6, 7, 9, 10, 11]) == {10, 11}  # a quarter, the last
    assert bulk_cpu_set("all", four) is None
    assert bulk_cpu_set("2", four) == {2}
    assert bulk_cpu_set("0,2-3", four) == {0, 2, 3}
    assert bulk_cpu_set("1-1, 3", four) == {1, 3}
    for bad in ("", "x", "3-1", "-1", "1-", "1,,2", "²", "1 2", "99999", "0-99999999999"):
        with pytest.raises(ValueError, match="not a list of CPUs"):
            bulk_cpu_set(bad, four)
    with pytest.raises(ValueError, match="CPU 4 is not one serve may use \\(0-3\\)"):
        bulk_cpu_set("2-5", four)
    assert cpu_list([0, 1, 2, 3, 6, 8, 9]) == "0-3,6,8-9"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to set apart")
async def test_the_bulk_process_and_its_backends_keep_to_their_cpus(fresh_dsn: str) -> None:
    """By default the bulk process and its PostgreSQL backends run on the last quarter of the
    CPUs (at least one), the front on all; SCIMLEDGER_BULK_CPUS says which."""
    usable = sorted(os.sched_getaffinity(0))
    everything, token = cpu_list(usable), ""
    for setting, expected in (
        (None, cpu_list(usable[-max(1, len(usable) // 4) :])),
        (str(usable[0]), str(usable[0])),
        ("all", everything),
    ):
        env = {"SCIMLEDGER_BULK_BODY_BYTES": "2048"}
        if setting is not None:
            env["SCIMLEDGER_BULK_CPUS"] = setting
        proc, banner, port = await serve("--workers", "1", "--database-url", fresh_dsn, env=env)
        try:
            token = token or _token(banner)  # the first start's (the tenant it made)
            headers = {"Authorization": f"Bearer {token}"}
            [bulk] = bulk_of(proc.pid)
            user = entra_user(f"big-{setting}@contoso.com")
            user["emails"] = [{"type": "work", "value": f"a{i}@contoso.com"} for i in range(80)]
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{port}/scim/v2/Users"
                async with http.post(url, json=user, headers=headers) as r:
                    assert r.status == 201, await r.text()  # served by the bulk process
            db = await asyncpg.connect(fresh_dsn)
            try:
                rows = await db.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                    f"scimledger:{bulk.pid}",
                )
            finally:
                await db.close()
            assert rows, "the bulk process has no backend"
            assert _cpus_of(bulk.pid) == expected, setting
            assert {_cpus_of(row["pid"]) for row in rows} == {expected}, setting
            assert _cpus_of(proc.pid) == everything
        finally:
            assert await _stop(proc) == 0


async def test_a_bad_cpu_list_stops_serve_before_it_starts(fresh_dsn: str) -> None:
    for bad in ("two", "4096"):
        env = {"SCIMLEDGER_BULK_CPUS": bad}
        code, _out, err = await run("serve", "--port", "0", "--database-url", fresh_dsn, env=env)
        assert code == 1, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert err.startswith(f"scimledger: error: SCIMLEDGER_BULK_CPUS='{bad}': ")
