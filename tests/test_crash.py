"""Nothing lost: SIGKILL `scimledger serve` in the middle of a concurrent write load.

Every request that got a 2xx before the kill is in the store (its events and its audit record,
under its request id) and in the views after a restart; a request in flight at the kill is
either wholly there or not at all; and a rebuild of every projection equals the live views.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from infra.database import Database
from infra.tenants import IssuedToken
from tests.test_cli import SCIMLEDGER, free_port, run
from tests.test_entra_groups import GROUP
from tests.test_entra_users import PATCH_OP, SCIM
from tests.test_projections import settle

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
WORKERS = 8
ACKS_BEFORE_KILL = 150


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


async def start_server(dsn: str, log: Path) -> tuple[asyncio.subprocess.Process, str]:
    """`scimledger serve` on the test's database, its output to a file (a pipe nobody reads
    would fill up and stall it); returns once /readyz answers."""
    port = free_port()
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            SCIMLEDGER,
            "serve",
            "--port",
            str(port),
            "--database-url",
            dsn,
            stdout=out,
            stderr=out,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            assert proc.returncode is None, _tail(log)
            try:
                async with http.get(f"{base}/readyz") as r:
                    if r.status == 200:
                        return proc, base
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "serve never became ready"
            await asyncio.sleep(0.1)


async def stop(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> None:
    if proc.returncode is None:
        proc.send_signal(sig)
    await asyncio.wait_for(proc.wait(), timeout=60)


@dataclass
class Ledger:
    """What the clients were told. `maybe` holds the outcome of the one request per worker
    that was in flight at the kill: it may or may not have committed."""

    acked_requests: list[str] = field(default_factory=list)
    display: dict[str, set[str]] = field(default_factory=dict)  # user id -> allowed names
    acked_display: dict[str, str] = field(default_factory=dict)
    members: dict[str, set[str]] = field(default_factory=dict)  # group id -> acked members
    maybe_members: dict[str, set[str]] = field(default_factory=dict)

    @property
    def acks(self) -> int:
        return len(self.acked_requests)


async def worker(
    http: aiohttp.ClientSession, base: str, token: str, w: int, ledger: Ledger
) -> None:
    """create user -> rename it -> add it to this worker's group, over and over."""

    async def call(method: str, path: str, body: dict[str, Any]) -> tuple[int, Any, str]:
        """Status, body and the request's id (the service's own, from X-Request-Id)."""
        headers = {"Authorization": f"Bearer {token}", "Content-Type": SCIM}
        async with http.request(method, f"{base}{path}", json=body, headers=headers) as r:
            text = await r.text()
            parsed = (await r.json(content_type=None)) if text else None
            return r.status, parsed, r.headers["X-Request-Id"]

    def ack(status: int, expected: int, request_id: str) -> None:
        assert status == expected, (status, request_id)
        ledger.acked_requests.append(request_id)

    try:
        status, group, rid = await call(
            "POST", "/scim/v2/Groups", {"schemas": [GROUP], "displayName": f"crash {w}"}
        )
        ack(status, 201, rid)
        gid = group["id"]
        ledger.members[gid], ledger.maybe_members[gid] = set(), set()
        for k in range(10_000):
            name = f"w{w}-u{k}@contoso.com"
            status, user, rid = await call(
                "POST", "/scim/v2/Users", {"schemas": [USER], "userName": name, "displayName": name}
            )
            ack(status, 201, rid)
            uid = user["id"]
            ledger.acked_display[uid] = name
            ledger.display[uid] = {name, f"renamed {name}"}  # the rename may be in flight
            rename = {"op": "replace", "path": "displayName", "value": f"renamed {name}"}
            body = {"schemas": [PATCH_OP], "Operations": [rename]}
            status, _, rid = await call("PATCH", f"/scim/v2/Users/{uid}", body)
            ack(status, 200, rid)
            ledger.acked_display[uid] = f"renamed {name}"
            ledger.display[uid] = {f"renamed {name}"}
            ledger.maybe_members[gid] = {uid}
            body = {
                "schemas": [PATCH_OP],
                "Operations": [{"op": "add", "path": "members", "value": [{"value": uid}]}],
            }
            status, _, rid = await call("PATCH", f"/scim/v2/Groups/{gid}", body)
            ack(status, 204, rid)
            ledger.members[gid].add(uid)
            ledger.maybe_members[gid] = set()
    except (TimeoutError, aiohttp.ClientError):
        return  # the server is gone: this worker's in-flight request is in `maybe`


async def test_sigkill_under_write_load_loses_no_acknowledged_request(
    fresh_dsn: str, database: Database, tenant: IssuedToken, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    proc, base = await start_server(fresh_dsn, log)
    ledger = Ledger()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            workers = [
                asyncio.create_task(worker(http, base, tenant.token, w, ledger))
                for w in range(WORKERS)
            ]
            deadline = time.monotonic() + 120
            while ledger.acks < ACKS_BEFORE_KILL:
                assert not all(t.done() for t in workers), [t.exception() for t in workers]
                assert time.monotonic() < deadline, f"only {ledger.acks} acks"
                await asyncio.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)  # mid-load: every worker has a request in flight
            await asyncio.gather(*workers)  # a worker's own assertion error fails the test
        await stop(proc)
        # (Its exit status is not checked: asyncio reports 255 when the kernel's reaping
        # races its child watcher.) It is gone: nothing listens on its port any more.
        async with aiohttp.ClientSession() as http:
            try:
                async with http.get(f"{base}/readyz"):
                    raise AssertionError("the killed server still answers")
            except aiohttp.ClientConnectionError:
                pass
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    proc, base = await start_server(fresh_dsn, log)
    try:
        await check_after_restart(database, base, tenant.token, ledger)
        code, out, err = await run("projections", "verify", "--all", "--database-url", fresh_dsn)
        assert code == 0 and "no drift" in out, (out, err)
    finally:
        await stop(proc)


async def check_after_restart(db: Database, base: str, token: str, ledger: Ledger) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    pool = db.pool
    # Every acknowledged write is in the store: its audit record and its domain events.
    rows = await pool.fetch(
        "SELECT request_id,"
        " count(*) FILTER (WHERE topic LIKE 'domain.request:%') AS records,"
        " count(*) FILTER (WHERE topic NOT LIKE 'domain.request:%') AS events"
        " FROM stored_events WHERE request_id = any($1::text[]) GROUP BY request_id",
        ledger.acked_requests,
    )
    stored = {r["request_id"]: (r["records"], r["events"]) for r in rows}
    missing = [rid for rid in ledger.acked_requests if rid not in stored]
    assert not missing, f"{len(missing)} acknowledged requests are not in the store"
    assert all(records == 1 and events >= 1 for records, events in stored.values()), stored

    # No request is half-applied: whatever wrote domain events wrote its record with them,
    # and every view row is at the head of its stream.
    outcomes: dict[str, list[str]] = {}
    changed: set[str] = set()
    for row in await pool.fetch("SELECT request_id, topic, state FROM stored_events"):
        if row["topic"].startswith("domain.request:"):
            outcomes.setdefault(row["request_id"], []).append(json.loads(row["state"])["outcome"])
        else:
            changed.add(row["request_id"])
    torn = {rid: outcomes.get(rid) for rid in changed if outcomes.get(rid) != ["success"]}
    assert not torn, torn
    behind = await pool.fetchval(
        "SELECT count(*) FROM (SELECT id, version FROM scim_users UNION ALL"
        " SELECT id, version FROM scim_groups) v"
        " WHERE v.version <> (SELECT max(originator_version) FROM stored_events e"
        " WHERE e.originator_id = v.id)"
    )
    assert behind == 0

    # The views answer with the acknowledged state.
    async with aiohttp.ClientSession(headers=auth) as http:
        for uid, allowed in ledger.display.items():
            async with http.get(f"{base}/scim/v2/Users/{uid}") as r:
                assert r.status == 200, uid
                assert (await r.json(content_type=None))["displayName"] in allowed
        for gid, acked in ledger.members.items():
            async with http.get(f"{base}/scim/v2/Groups/{gid}") as r:
                assert r.status == 200, gid
                body = await r.json(content_type=None)
            members = {m["value"] for m in body.get("members", [])}
            assert acked <= members <= acked | ledger.maybe_members[gid], gid
        # And the restarted service takes writes again.
        body = {"schemas": [USER], "userName": "after-restart@contoso.com"}
        async with http.post(f"{base}/scim/v2/Users", json=body) as r:
            assert r.status == 201
    await settle(db, within=60)
