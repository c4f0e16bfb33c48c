"""What declared extension attributes cost: a user with 20 of them against a plain user.

    .venv/bin/python -m bench.extensions [--quick]        (also run by `make bench-quick`)

Two tenants on one durable embedded PostgreSQL: `plain`, and `ext`, which declares one User
extension of 20 attributes (strings, numbers, booleans, a dateTime; `badge` unique, so
indexed). Each round POSTs a batch of users to each tenant (Entra's body; the `ext` one with
the 20 attributes), then looks each one up: `userName eq` for `plain`, `urn:…:badge eq` for
`ext` (the lookup Entra would send if the admin matched on that attribute). Rounds alternate
the tenants so both see the same machine. The app runs in this process (aiohttp TestServer),
on the real write path with its projections running; the ratio is the target (issue 15:
at most 1.2x). The table is also written to bench/results/extensions-latest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from bench.common import ROOT, durable_postgres, machine, median, revision
from infra.config import Settings
from infra.database import open_database
from infra.logging import configure
from infra.schemas import declare, parse_declaration
from infra.tenants import create_tenant
from service.app import create_app

RESULTS = ROOT / "bench" / "results" / "extensions-latest.md"
URN = "urn:ietf:params:scim:schemas:extension:Bench:2.0:User"
TYPES = ["string"] * 12 + ["integer"] * 3 + ["decimal"] * 2 + ["boolean"] * 2 + ["dateTime"]
SCHEMA = {
    "id": URN,
    "attributes": [{"name": "badge", "type": "string", "uniqueness": "server"}]
    + [{"name": f"a{i}", "type": kind} for i, kind in enumerate(TYPES[1:], 1)],
}
SCIM = {"Content-Type": "application/scim+json"}
TARGET = 1.2


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
        values: dict[str, Any] = {"badge": f"B-{user_name}"}
        for i, kind in enumerate(TYPES[1:], 1):
            values[f"a{i}"] = sample.get(kind, "2026-01-05T09:00:00Z")
        user[URN] = values
    return user


async def timed(calls: list[Callable[[], Awaitable[None]]], concurrency: int) -> float:
    """Seconds to run `calls`, `concurrency` at a time."""
    queue = list(reversed(calls))

    async def worker() -> None:
        while queue:
            await queue.pop()()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def run(rounds: int, batch: int, concurrency: int) -> list[tuple[str, float, float]]:
    with durable_postgres() as dsn, tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp), database_url=dsn, rate_limit=0, max_concurrent_per_token=0
        )
        async with open_database(settings) as db:
            async with db.pool.acquire() as conn:
                tokens = {
                    name: (await create_tenant(conn, name)).token for name in ("plain", "ext")
                }
                await declare(conn, db.store, "ext", parse_declaration(SCHEMA), "User", "bench")
            auth = {t: {"Authorization": f"Bearer {token}"} for t, token in tokens.items()}
            async with TestClient(TestServer(create_app(settings, db), host="127.0.0.1")) as c:
                seconds: dict[tuple[str, str], list[float]] = {}

                def post(tenant: str, name: str) -> Callable[[], Awaitable[None]]:
                    async def call() -> None:
                        r = await c.post(
                            "/scim/v2/Users",
                            json=body(name, tenant == "ext"),
                            headers={**auth[tenant], **SCIM},
                        )
                        assert r.status == 201, await r.text()

                    return call

                def lookup(tenant: str, name: str) -> Callable[[], Awaitable[None]]:
                    query = (
                        f'{URN}:badge eq "b-{name}"'
                        if tenant == "ext"
                        else (f'userName eq "{name.upper()}"')
                    )

                    async def call() -> None:
                        r = await c.get(
                            "/scim/v2/Users", params={"filter": query}, headers=auth[tenant]
                        )
                        found = await r.json(content_type=None)
                        assert r.status == 200 and found["totalResults"] == 1, found

                    return call

                for n in range(rounds):
                    order = ("plain", "ext") if n % 2 == 0 else ("ext", "plain")
                    for tenant in order:
                        names = [f"u{n}-{i}@{tenant}.example" for i in range(batch)]
                        for operation, make in (("POST", post), ("filter lookup", lookup)):
                            took = await timed([make(tenant, m) for m in names], concurrency)
                            seconds.setdefault((operation, tenant), []).append(took / batch)
    return [
        (op, median(seconds[(op, "plain")]), median(seconds[(op, "ext")]))
        for op in ("POST", "filter lookup")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: about a minute")
    ns = parser.parse_args()
    configure(logging.WARNING)  # not a line per request
    rounds, batch, concurrency = (4, 200, 8) if ns.quick else (10, 500, 8)
    rows = asyncio.run(run(rounds, batch, concurrency))
    lines = [
        f"# Declared extension attributes ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC,"
        f" {revision()}, {machine()})",
        "",
        f"{rounds} rounds of {batch} users per tenant, concurrency {concurrency};"
        " median of the rounds' mean time per request.",
        "",
        "| operation | plain user ms | user with 20 declared attributes ms | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for operation, plain, ext in rows:
        ok = "ok" if ext / plain <= TARGET else "MISSED"
        lines.append(
            f"| {operation} | {plain * 1000:.2f} | {ext * 1000:.2f} | {ext / plain:.2f}x"
            f" | ≤{TARGET}x {ok} |"
        )
    text = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
