"""Row (11): what declared extension attributes cost (issue 15: at most 1.2x): POST and a
filter lookup of a user with 20 of them (`badge` unique, so indexed; looked up by `urn:…:badge
eq`) against a plain one (`userName eq`), in-process app on the real write path, rounds
alternating tenants."""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from bench.common import drain, make_database
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
SCIM = {"Content-Type": "application/scim+json"}
TARGET = 1.2
CONCURRENCY = 8


def body(user_name: str, extended: bool) -> dict[str, Any]:
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
    return user


Client = TestClient[Any, Any]


async def call(c: Client, auth: dict[str, str], op: str, ext: bool, name: str) -> None:
    """One POST, or one lookup that must find the user."""
    if op == "POST":
        r = await c.post("/scim/v2/Users", json=body(name, ext), headers={**auth, **SCIM})
        assert r.status == 201, await r.text()
        return
    query = f'{URN}:badge eq "b-{name}"' if ext else f'userName eq "{name.upper()}"'
    r = await c.get("/scim/v2/Users", params={"filter": query}, headers=auth)
    found = await r.json(content_type=None)
    assert r.status == 200 and found["totalResults"] == 1, found


async def timed(c: Client, auth: dict[str, str], op: str, ext: bool, names: list[str]) -> float:
    """Mean seconds per request over `names`, CONCURRENCY at a time."""
    started = time.perf_counter()
    await drain(names, lambda name: call(c, auth, op, ext, name), CONCURRENCY)
    return (time.perf_counter() - started) / len(names)


async def run(dsn: str, rounds: int, batch: int) -> list[tuple[str, float, float]]:
    """Per operation: the median over rounds of the mean seconds per request, plain and ext."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp), database_url=dsn, rate_limit=0, max_concurrent_per_token=0
        )
        async with open_database(settings) as db:
            async with db.pool.acquire() as conn:
                tokens = {t: (await create_tenant(conn, t)).token for t in ("plain", "ext")}
                await declare(conn, db.store, "ext", parse_declaration(SCHEMA), "User", "bench")
            auth = {t: {"Authorization": f"Bearer {token}"} for t, token in tokens.items()}
            seconds: dict[tuple[str, str], list[float]] = {}
            async with TestClient(TestServer(create_app(settings, db), host="127.0.0.1")) as c:
                for n in range(rounds):
                    for tenant in ("plain", "ext") if n % 2 == 0 else ("ext", "plain"):
                        names = [f"u{n}-{i}@{tenant}.example" for i in range(batch)]
                        for op in ("POST", "filter lookup"):
                            took = await timed(c, auth[tenant], op, tenant == "ext", names)
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
