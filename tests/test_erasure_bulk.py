"""A 409 served by the bulk process (a large body, service/bulk.py) quotes the userName another
user holds: its record is sealed under the holder's key there too (issue 17, service/taken.py)."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
import orjson
import psutil

from tests.test_bulk import _big_user, _serve
from tests.test_cli import _stop, _token
from tests.test_runner import eventually

ADA = "Ada.Bulk@contoso.com"


async def test_a_409_served_by_the_bulk_process_is_sealed_under_the_holders_key(
    fresh_dsn: str,
) -> None:
    proc, banner, port = await _serve(fresh_dsn)
    base = f"http://127.0.0.1:{port}/scim/v2"
    headers = {
        "Authorization": f"Bearer {_token(banner)}",
        "Content-Type": "application/scim+json",
    }
    db = await asyncpg.connect(fresh_dsn)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/Users", data=_big_user(ADA), headers=headers) as r:
                assert r.status == 201, await r.text()
                ada = (await r.json(content_type=None))["id"]
            async with http.post(f"{base}/Users", data=_big_user(ADA), headers=headers) as r:
                assert r.status == 409, await r.text()
                request_id = r.headers["X-Request-Id"]
        record = await db.fetchval(
            "SELECT state FROM stored_events WHERE request_id = $1"
            " AND topic LIKE 'domain.request:%'",
            request_id,
        )
        error = orjson.loads(record)["error"]
        assert error["sealedFor"] == ada and error["detail"] == "[encrypted]", error
        raw = b"".join(r[0] for r in await db.fetch("SELECT state FROM stored_events"))
        assert ADA.encode() not in raw and ADA.lower().encode() not in raw
    finally:
        await db.close()
        everything = psutil.Process(proc.pid).children(recursive=True)
        assert await _stop(proc) == 0
        await eventually(lambda: asyncio.sleep(0, not any(p.is_running() for p in everything)))
    assert proc.stderr is not None
    lines = [orjson.loads(line) for line in (await proc.stderr.read()).splitlines()]
    served = [(line.get("process"), line["status"]) for line in lines if line["event"] == "request"]
    assert ("bulk", 409) in served, served  # the refused one was served by the bulk process
