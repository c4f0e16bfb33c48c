"""What declared extension attributes cost (issue 15: at most 1.2x): POST and a filter lookup
of a user with 20 of them (`badge` unique, so indexed; looked up by `urn:…:badge eq`) against a
plain one (`userName eq`), in-process app on the real write path, rounds alternating tenants."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from aiohttp.test_utils import TestClient, TestServer

from bench.common import ROOT, drain, durable_postgres, machine, median, revision
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
        values: dict[str, Any] = {"badge": f"B-{user_name}"}
        for i, kind in enumerate(TYPES[1:], 1):
            values[f"a{i}"] = sample.get(kind, "2026-01-05T09:00:00Z")
        user[URN] = values
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


async def run(rounds: int, batch: int) -> list[tuple[str, float, float]]:
    """Per operation: the median over rounds of the mean seconds per request, plain and ext."""
    with durable_postgres() as dsn, tempfile.TemporaryDirectory() as tmp:
        unlimited = {"rate_limit": 0, "max_concurrent_per_token": 0}
        settings = Settings(data_dir=Path(tmp), database_url=dsn, **unlimited)
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


@click.command(help=(__doc__ or "").splitlines()[0])
@click.option("--quick", is_flag=True, help="Fewer rounds: about a minute.")
def main(quick: bool) -> None:
    configure(logging.WARNING)  # not a line per request
    rounds, batch = (4, 200) if quick else (10, 500)
    rows = asyncio.run(run(rounds, batch))
    stamp = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {revision()}, {machine()}"
    text = f"""# Declared extension attributes ({stamp})

{rounds} rounds of {batch} users per tenant, concurrency {CONCURRENCY}; median of the rounds'
mean time per request.

| operation | plain user ms | user with 20 declared attributes ms | ratio | target |
|---|---|---|---|---|
"""
    for op, plain, ext in rows:
        ok = "ok" if ext / plain <= TARGET else "MISSED"
        ratio = f"{ext / plain:.2f}x | ≤{TARGET}x {ok}"
        text += f"| {op} | {plain * 1000:.2f} | {ext * 1000:.2f} | {ratio} |\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
