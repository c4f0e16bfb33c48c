"""The bulk process runs further behind everyone while it serves requests, and comes back to
its usual weight once idle, for its projection runners (service/limits_cpu.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from service.limits_cpu import BULK_NICENESS, SERVING_NICENESS
from tests.test_bulk import _serve
from tests.test_cli import _stop, _token
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
