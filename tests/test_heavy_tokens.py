"""A token whose requests cost the front CPU is served by the bulk process for a while
(service/limits_cost.py), run as `serve` runs it."""

from __future__ import annotations

import asyncio
import contextvars
import time

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from infra.tenants import create_tenant
from service import limits_cost
from service.limits_cost import HeavyTokens, MeteredExecutor, Spent
from tests.test_bulk_accept import _handoffs
from tests.test_cli import _serve as serve
from tests.test_cli import _stop, _token
from tests.test_entra_users import entra_user


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_a_worker_thread_s_cpu_is_charged_to_the_request_that_submitted_it() -> None:
    loop = asyncio.get_running_loop()
    executor = MeteredExecutor(max_workers=2)
    try:
        spent, other = Spent(), Spent()

        async def request(cell: Spent, seconds: float) -> None:
            limits_cost._SPENT.set(cell)
            await loop.run_in_executor(executor, _burn, seconds)

        await asyncio.gather(
            asyncio.create_task(request(spent, 0.05), context=contextvars.Context()),
            asyncio.create_task(request(other, 0.005), context=contextvars.Context()),
        )
        assert 0.05 <= spent.seconds < 0.5
        assert 0.005 <= other.seconds < 0.05
        # Outside a request nothing is charged (and nothing breaks).
        await loop.run_in_executor(executor, _burn, 0.001)
    finally:
        executor.shutdown()


def _request(token: str | None) -> aiohttp.web.Request:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return make_mocked_request("POST", "/scim/v2/Users", headers=headers)


def test_a_mark_lasts_its_time_after_the_last_request_and_the_table_keeps_the_newest() -> None:
    heavy = HeavyTokens(seconds=60, limit=2)
    assert not heavy.holds(_request("a"))
    assert heavy.mark(limits_cost.digest("a"), now=0.0)  # newly marked
    assert not heavy.mark(limits_cost.digest("a"), now=0.0)  # marked again: not news
    assert heavy.holds(_request("a"), now=59.0)
    assert not heavy.holds(_request("b"), now=59.0) and not heavy.holds(_request(None), now=59.0)
    # Held at 59 s, so marked until 119 s: a token that keeps sending never gets back to the
    # front; one that stops for the whole time does.
    assert heavy.holds(_request("a"), now=118.0)
    assert not heavy.holds(_request("a"), now=178.0) and len(heavy) == 0  # expired, dropped
    for name in ("a", "b", "c"):
        heavy.mark(limits_cost.digest(name), now=200.0)
    assert len(heavy) == 2 and not heavy.holds(_request("a"), now=201.0)
    assert heavy.holds(_request("b"), now=201.0) and heavy.holds(_request("c"), now=201.0)
    # Held, a mark is the newest: "b" is kept when another comes, "c" is dropped.
    assert heavy.holds(_request("b"), now=202.0)
    heavy.mark(limits_cost.digest("d"), now=203.0)
    assert heavy.holds(_request("b"), now=204.0) and not heavy.holds(_request("c"), now=204.0)


async def _serve(dsn: str) -> tuple[asyncio.subprocess.Process, str, int]:
    # 1 ms: a PATCH of a user of 1000 values takes more in a worker thread on any machine.
    env = {"SCIMLEDGER_BULK_TOKEN_CPU": "0.001"}
    return await serve("--workers", "1", "--database-url", dsn, env=env)


@pytest.mark.parametrize("costly", [True, False])
async def test_a_token_that_costs_the_front_cpu_is_served_by_the_bulk_process(
    fresh_dsn: str, costly: bool
) -> None:
    proc, banner, port = await _serve(fresh_dsn)
    base = f"http://127.0.0.1:{port}/scim/v2"
    db = await asyncpg.connect(fresh_dsn)
    try:
        other = (await create_tenant(db, "other")).token
    finally:
        await db.close()
    served: dict[str, str] = {}  # what each request was: its X-Request-Id

    async def send(token: str, method: str, path: str, body: object, what: str) -> None:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"}
        raw = None if body is None else orjson.dumps(body)
        async with http.request(method, base + path, data=raw, headers=headers) as r:
            assert r.status < 300, await r.text()
            served[r.headers["X-Request-Id"]] = what
            if what == "create":
                created.append((await r.json(content_type=None))["id"])

    created: list[str] = []
    hostile = _token(banner)
    try:
        async with aiohttp.ClientSession() as http:
            user = entra_user("many@contoso.com")
            # 1000 values (the cap) in a body under the bulk threshold: served by the front.
            user["emails"] = [{"type": "work", "value": f"a{i}@contoso.com"} for i in range(1000)]
            assert len(orjson.dumps(user)) < 64 * 1024
            await send(hostile, "POST", "/Users", user, "create")
            patch = {
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{"op": "replace", "path": "displayName", "value": "Many"}],
            }
            if costly:  # a user of many values is changed in a worker thread of the front
                await send(hostile, "PATCH", f"/Users/{created[0]}", patch, "costly")
            await send(hostile, "POST", "/Users", entra_user("next@contoso.com"), "next")
            await send(hostile, "GET", f"/Users/{created[0]}", None, "get")
            await send(other, "POST", "/Users", entra_user("other@contoso.com"), "other")
        # First on a new connection, a heavy token's small body is handed over as the front
        # accepts it, before aiohttp reads a byte (service/bulk_accept.py).
        fresh = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=fresh) as http:
            await send(hostile, "POST", "/Users", entra_user("fresh@contoso.com"), "fresh")
            await send(other, "POST", "/Users", entra_user("other2@contoso.com"), "other2")
            handoffs = await _handoffs(http, port)
    finally:
        assert await _stop(proc) == 0
    assert proc.stderr is not None
    lines = [orjson.loads(line) for line in (await proc.stderr.read()).splitlines()]
    where = {
        served[line["request_id"]]: line.get("process") or "front"
        for line in lines
        if line["event"] == "request" and line.get("request_id") in served
    }
    expected = {"create": "front", "next": "front", "get": "front", "other": "front"}
    expected |= {"fresh": "front", "other2": "front"}
    if costly:
        # The costly request itself was served by the front; the token's next request with a
        # body goes to the bulk process. A GET, and another tenant's requests, stay.
        expected |= {"costly": "front", "next": "bulk", "fresh": "bulk"}
    assert where == expected
    # `next` from within aiohttp (its connection was kept alive), `fresh` at accept.
    assert handoffs == ({"request": 1.0, "accept": 1.0} if costly else {})
    marked = [line for line in lines if line["event"] == "token served by the bulk process"]
    assert [(m["tenant"], m["cpu_ms"] > 1) for m in marked] == [("default", True)] * costly
