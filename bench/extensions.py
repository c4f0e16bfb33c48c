"""Row (11): what declared extension attributes cost (issue 15: at most 1.2x): POST and a
filter lookup of a user with 20 of them (`badge` unique, so indexed; looked up by `urn:…:badge
eq`) against a plain one (`userName eq`), in-process app on the real write path, rounds
alternating tenants."""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from bench.common import BenchError, Scim, drain, make_database
from bench.table import Ctx, Row, median, verdict
from infra.config import Settings
from infra.database import open_database
from infra.logging import configure
from infra.schemas import declare, parse_declaration
from infra.tenants import create_tenant
from service.app import create_app

URN = "urn:ietf:params:scim:schemas:extension:Bench:2.0:User"
TYPES = ["string"] * 12 + ["integer"] * 3 + ["decimal"] * 2 + ["boolean"] * 2 + ["dateTime"]
SCHEMA = {
    "id": URN,
    "attributes": [{"name": "badge", "type": "string", "uniqueness": "server"}]
    + [{"name": f"a{i}", "type": kind} for i, kind in enumerate(TYPES[1:], 1)],
}
TARGET = 1.2
CONCURRENCY = 8


def body(user_name: str, extended: bool) -> bytes:
    user: dict[str, Any] = {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "externalId": str(uuid.uuid4()),
        "userName": user_name,
        "active": True,
        "emails": [{"primary": True, "type": "work", "value": user_name}],
        "name": {"formatted": "Given Family", "familyName": "Family", "givenName": "Given"},
    }
    if extended:
        sample = {"string": "value", "integer": 7, "decimal": 1.5, "boolean": "True"}
        user[URN] = {"badge": f"B-{user_name}"} | {
            f"a{i}": sample.get(kind, "2026-01-05T09:00:00Z") for i, kind in enumerate(TYPES[1:], 1)
        }
    return orjson.dumps(user)


async def call(scim: Scim, op: str, ext: bool, name: str) -> None:
    """One POST, or one lookup that must find the user."""
    if op == "POST":
        await scim.create("Users", body(name, ext))
        return
    query = f'{URN}:badge eq "b-{name}"' if ext else f'userName eq "{name.upper()}"'
    found = orjson.loads(await scim.send("GET", f"/Users?filter={quote(query)}"))
    if found["totalResults"] != 1:
        raise BenchError(f"{query!r} found {found['totalResults']} users")


async def run(dsn: str, rounds: int, batch: int) -> list[tuple[str, float, float]]:
    """Per operation: the median over rounds of the mean seconds per request (CONCURRENCY at a
    time), plain and ext."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp), database_url=dsn, rate_limit=0, max_concurrent_per_token=0
        )
        async with open_database(settings) as db:
            async with db.pool.acquire() as conn:
                tokens = {t: (await create_tenant(conn, t)).token for t in ("plain", "ext")}
                await declare(conn, db.store, "ext", parse_declaration(SCHEMA), "User", "bench")
            seconds: dict[tuple[str, str], list[float]] = {}
            app = create_app(settings, db)
            async with TestServer(app, host="127.0.0.1") as server, ClientSession() as session:
                base = str(server.make_url("/scim/v2"))
                for n in range(rounds):
                    for tenant in ("plain", "ext") if n % 2 == 0 else ("ext", "plain"):
                        scim, ext = Scim(session, base, tokens[tenant]), tenant == "ext"
                        names = [f"u{n}-{i}@{tenant}.example" for i in range(batch)]
                        for op in ("POST", "filter lookup"):
                            started = time.perf_counter()
                            await drain(names, partial(call, scim, op, ext), CONCURRENCY)
                            took = (time.perf_counter() - started) / batch
                            seconds.setdefault((op, tenant), []).append(took)
    ops = ("POST", "filter lookup")
    return [(op, median(seconds[(op, "plain")]), median(seconds[(op, "ext")])) for op in ops]


async def extensions(ctx: Ctx) -> None:
    """(11) a user with 20 declared attributes against a plain one: POST and a filter lookup."""
    rounds, batch = ctx.sizes.extensions
    dsn = await make_database(ctx.dsn, "bench_extensions")
    configure(logging.WARNING)  # the in-process app: not a line per request
    for op, plain, ext in await run(dsn, rounds, batch):
        ratio = ext / plain
        ctx.add(Row("11", f"{op}, a user with 20 declared extension attributes vs a plain one",
            f"{rounds} rounds of {batch} users, concurrency {CONCURRENCY}",
            f"{ext * 1000:.2f} ms vs {plain * 1000:.2f} ms per request: {ratio:.2f} x", "",
            f"≤ {TARGET} x", verdict(ratio <= TARGET)))  # fmt: skip
    ctx.notes.append(
        "(11) bench.extensions: the in-process app on the real write path, tenants alternating"
        " each round; median over the rounds of the mean time per request"
    )
