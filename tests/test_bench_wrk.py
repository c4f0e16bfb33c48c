"""The benchmark's wrk scripts against a tiny server: unique users, right requests, counted
failures. Needs Debian's wrk, which `make test` installs when it is missing."""

from __future__ import annotations

import asyncio
import re
import shutil
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench import wrk
from bench.common import entra_body
from bench.lookups import NAME_FORMAT

TOKEN = "t0ken"


@pytest.fixture(autouse=True)
def wrk_installed() -> None:
    # Not a skip: `make test` installs wrk, so a missing one is a broken set-up, not a pass.
    if shutil.which("wrk") is None:
        pytest.fail("wrk not found: `make test` installs it (apt-get install wrk)")


async def serve(handler: Any) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_post_script_sends_unique_entra_bodies() -> None:
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        assert request.headers["Content-Type"] == "application/scim+json"
        seen.append(orjson.loads(await request.read()))
        # Every tenth request fails the way a duplicate would: counted as bad, not ignored.
        return web.Response(status=409 if len(seen) % 10 == 0 else 201)

    template = orjson.loads(entra_body(0))
    template["userName"] = template["emails"][0]["value"] = wrk.NAME
    template["externalId"] = wrk.EXTERNAL_ID
    script = wrk.post_users_script("/scim/v2/Users", TOKEN, orjson.dumps(template), "T")
    server = await serve(handler)
    try:
        origin = f"http://127.0.0.1:{server.port}"
        result = await asyncio.to_thread(wrk.run, origin, script, 1, 4)
    finally:
        await server.close()
    assert result.requests > 20 and len(seen) >= result.requests
    names = [body["userName"] for body in seen]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"T_\d+_\d{7}@Contoso\.com", n) for n in names)
    assert all(body["emails"][0]["value"] == body["userName"] for body in seen)
    assert len({body["externalId"] for body in seen}) == len(seen)
    assert {k: v for k, v in seen[0].items() if k not in ("userName", "emails", "externalId")} == {
        k: v for k, v in template.items() if k not in ("userName", "emails", "externalId")
    }
    assert result.bad == pytest.approx(result.requests / 10, abs=2)
    assert "409" in result.sample and result.p50 > 0 and result.cpu >= 0


async def test_find_script_asks_for_stored_users_in_any_case() -> None:
    asked: list[str] = []
    stored = {(NAME_FORMAT % i).lower() for i in range(50)}

    async def handler(request: web.Request) -> web.Response:
        found = re.fullmatch(r'userName eq "(.*)"', request.query["filter"])
        assert found is not None
        asked.append(found[1])
        total = 1 if found[1].lower() in stored and len(asked) % 7 else 0
        return web.json_response({"totalResults": total, "Resources": []})

    script = wrk.find_users_script("/scim/v2/Users", TOKEN, 50, NAME_FORMAT)
    server = await serve(handler)
    try:
        result = await asyncio.to_thread(wrk.run, f"http://127.0.0.1:{server.port}", script, 1, 4)
    finally:
        await server.close()
    assert result.requests > 20
    assert {a.lower() for a in asked} <= stored
    assert len({a for a in asked}) > len({a.lower() for a in asked})  # varied case
    # Every seventh reply found nobody: those, and only those, are bad.
    assert result.bad == pytest.approx(result.requests / 7, abs=2)
