"""Clients that never read a streamed reply, against the pool: what they hold, and what another
tenant sees meanwhile (issue 14). Figures, not a test: `make test` asserts the behaviour.

    .venv/bin/python -m bench.stalled_readers [--readers 10 20 30] [--per-token 3]
                                              [--entries 12000] [--code DIR]

Starts a durable embedded PostgreSQL and `scimledger serve` with its defaults (pool of 20, a
wait for a connection gives up after 30 s), from DIR with --code. Tenant A's provisioning log
gets --entries rows (about 1.1 KB each as JSON lines: 12,000 is about 13 MB). For each count
of readers, that many raw sockets (receive buffer 4 KB) ask for GET /audit/v1/export and never
read, spread over audit tokens of tenant A, --per-token each; then it reports how their replies
began (200, or 429 past the per-token cap), the pool's connections in use (from /metrics),
and the status and time of tenant B's GET /scim/v2/Users?count=1.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import asyncpg

from bench.users import Served, create_tenant, free_port, served, wait_ready
from infra.tenants import issue_token


async def _seed(dsn: str, entries: int, tokens: int) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE name = 'bench'")
        await conn.execute(
            "INSERT INTO audit_entries (transaction_id, id, tenant_id, activity_at, action, status,"
            " target_type, target_id, target_name, method, path, http_status, duration_ms)"
            " SELECT g, gen_random_uuid(), $1, now() - g * interval '1 second', 'update',"
            " 'success', 'User', gen_random_uuid(), repeat('x', 900), 'PATCH', '/scim/v2/Users/x',"
            " 200, 1.0 FROM generate_series(1, $2::int) g",
            tenant_id,
            entries,
        )
        return [
            (await issue_token(conn, "bench", "audit", f"reader-{i}")).token for i in range(tokens)
        ]
    finally:
        await conn.close()


def _stall(port: int, token: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        b"GET /audit/v1/export?format=jsonl HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    return sock


def _status(sock: socket.socket) -> str | None:
    """The reply's status code, peeked (the bytes stay unread), or None before it begins."""
    try:
        head = sock.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    return head[9:12].decode() if len(head) >= 12 else None


async def _pool_in_use(session: aiohttp.ClientSession, origin: str) -> tuple[int, int]:
    async with session.get(f"{origin}/metrics") as r:
        text = await r.text()
    values = {}
    for line in text.splitlines():
        if line.startswith("scimledger_db_pool_"):
            name, _, number = line.rpartition(" ")
            values[name] = int(float(number))
    return values["scimledger_db_pool_connections_in_use"], values[
        "scimledger_db_pool_max_connections"
    ]


async def _other_tenant(session: aiohttp.ClientSession, origin: str, token: str) -> str:
    started = time.monotonic()
    try:
        async with session.get(
            f"{origin}/scim/v2/Users?count=1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=90),
        ) as r:
            await r.read()
            status = str(r.status)
    except TimeoutError:
        status = "no answer"
    return f"{status} in {time.monotonic() - started:.2f} s"


async def _run(s: Served, port: int, readers: list[int], per_token: int, entries: int) -> list[str]:
    origin = f"http://127.0.0.1:{port}"
    tokens = await _seed(s.dsn, entries, math.ceil(max(readers) / per_token))
    other = create_tenant(s.dsn)  # "bench" exists: a tenant of its own
    rows = [
        "| stalled readers | audit tokens | replies begun 200 / 429 / not yet | pool in use"
        " | tenant B's GET /Users |",
        "| --- | --- | --- | --- | --- |",
    ]
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, origin, s.proc, s.log)
        for n in readers:
            socks = [_stall(port, tokens[i // per_token]) for i in range(n)]
            for _ in range(200):  # up to 20 s for every reply to begin
                if all(_status(x) is not None for x in socks):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(2)  # the begun replies fill the socket buffers and wait
            statuses = [_status(x) for x in socks]
            in_use, size = await _pool_in_use(session, origin)
            seen = await _other_tenant(session, origin, other)
            begun = f"{statuses.count('200')} / {statuses.count('429')} / {statuses.count(None)}"
            rows.append(
                f"| {n} | {math.ceil(n / per_token)} | {begun} | {in_use} of {size} | {seen} |"
            )
            print(rows[-1], flush=True)
            for x in socks:
                x.close()
            for _ in range(600):  # until the cut replies have given their connections back
                if (await _pool_in_use(session, origin))[0] <= 1:
                    break
                await asyncio.sleep(0.1)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--readers", type=int, nargs="+", default=[10, 20, 30])
    parser.add_argument("--per-token", type=int, default=3)
    parser.add_argument("--entries", type=int, default=12_000)
    parser.add_argument("--code", type=Path, help="run the server from this checkout")
    ns = parser.parse_args(argv)
    if ns.code is not None:
        os.environ["PYTHONPATH"] = str(ns.code.resolve())
    port = free_port()
    with served(port, "bench-stalled-") as s:
        rows = asyncio.run(_run(s, port, ns.readers, ns.per_token, ns.entries))
    print(f"\nserver code: {ns.code or 'this checkout'}\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
