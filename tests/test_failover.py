"""A PostgreSQL failover under load: the primary is SIGKILLed, its synchronous standby promoted.

The service runs on the pair's two-host URL (target_session_attrs=read-write), 16 clients
create users and add them to groups. Then: every acknowledged write is on the new primary, the
service answered nothing in 5xx but 503 (a SCIM Error with Retry-After), it was back within
10 s of the promotion, the provisioning log has an entry for every request answered (the 503s
too, written once the database was back), the followers continue on the new primary with no
gap and no duplicate (transaction ids continue from the standby's replayed state), and
`projections verify --all` is clean.

Each run logs one line `failover window` (seconds from the SIGKILL and from the promotion to
the first acknowledged write); with SCIMLEDGER_FAILOVER_LOG set it is appended there as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiohttp import ClientError
from aiohttp.test_utils import TestClient, TestServer

from infra.config import Settings
from infra.tenants import create_tenant
from service.app import create_app
from service.state import DATABASE
from tests.pg_pair import PgPair
from tests.test_entra_groups import GROUP
from tests.test_entra_users import PATCH_OP, entra_user
from tests.test_runner import eventually

Client = TestClient[Any, Any]
SCIM = "application/scim+json"
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
WRITERS = 16
GROUPS = 4
LOAD_BEFORE_KILL = 2.0  # seconds of load on the old primary
DETECTION = 0.5  # the orchestrator's time to notice, before it promotes
LOAD_AFTER_BACK = 2.0  # seconds of load once writes are acknowledged again
BACK_WITHIN = 10.0


@dataclass
class Outcome:
    kind: str  # "user" or "member"
    status: int  # 0: no reply at all (a transport error)
    request_id: str | None
    started: float
    ended: float
    target: str | None
    retry_after: str | None
    body: bytes


async def _write(
    client: Client, kind: str, method: str, path: str, body: Any, auth: dict[str, str]
) -> Outcome:
    started = time.monotonic()
    try:
        r = await asyncio.wait_for(
            client.request(
                method, path, data=orjson.dumps(body), headers={**auth, "Content-Type": SCIM}
            ),
            60,
        )
        raw = await r.read()
    except (ClientError, TimeoutError) as e:
        return Outcome(kind, 0, None, started, time.monotonic(), None, None, repr(e).encode())
    target = None
    if kind == "user" and r.status == 201:
        target = orjson.loads(raw)["id"]
    return Outcome(
        kind,
        r.status,
        r.headers.get("X-Request-Id"),
        started,
        time.monotonic(),
        target,
        r.headers.get("Retry-After"),
        raw,
    )


async def _writer(
    client: Client,
    auth: dict[str, str],
    groups: list[str],
    n: int,
    stop: asyncio.Event,
    outcomes: list[Outcome],
    members: list[tuple[str, str]],
) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        user = await _write(
            client, "user", "POST", "/scim/v2/Users",
            entra_user(f"w{n}-{i}-{uuid.uuid4().hex[:6]}@x.com"), auth,
        )
        outcomes.append(user)
        if user.status != 201:
            await asyncio.sleep(0.05)  # as a client would, before it tries again
            continue
        assert user.target is not None
        group = groups[i % len(groups)]
        add = {
            "schemas": [PATCH_OP],
            "Operations": [{"op": "add", "path": "members", "value": [{"value": user.target}]}],
        }
        member = await _write(client, "member", "PATCH", f"/scim/v2/Groups/{group}", add, auth)
        member.target = f"{group}/{user.target}"
        outcomes.append(member)
        if member.status == 204:
            members.append((group, user.target))


def _append_line(path: Path, line: str) -> None:
    with path.open("a") as f:
        f.write(line + "\n")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "scimledger"), *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def _verify(url: str) -> subprocess.CompletedProcess[str]:
    return _cli("projections", "verify", "--all", "--quiet", "--database-url", url)


async def test_failover_loses_no_acknowledged_write(tmp_path: Path) -> None:
    pair = PgPair(tmp_path / "pair")
    await asyncio.to_thread(pair.start)
    try:
        await _doctor(pair)
        await _failover(pair, tmp_path)
    finally:
        await asyncio.to_thread(pair.stop)


async def _doctor(pair: PgPair) -> None:
    """`scimledger doctor` on the pair: clean with the standby synchronous; a failing check
    (exit 1) naming the risk once the standby is asynchronous."""
    done = await asyncio.to_thread(_cli, "doctor", "--json", "--database-url", pair.url)
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {c["check"]: c for c in map(orjson.loads, done.stdout.splitlines())}
    assert checks["standby"] == {
        "check": "standby", "ok": True, "detail": "synchronous standby: standby1"
    }
    assert checks["synchronous_commit"]["ok"] and checks["primary"]["ok"]

    await asyncio.to_thread(
        pair.primary.psql, "ALTER SYSTEM SET synchronous_standby_names = ''"
    )
    await asyncio.to_thread(pair.primary.psql, "SELECT pg_reload_conf()")
    try:
        async def asynchronous() -> bool:
            state = await asyncio.to_thread(
                pair.primary.psql, "SELECT string_agg(sync_state, ',') FROM pg_stat_replication"
            )
            return state == "async"

        await eventually(asynchronous, 10)
        done = await asyncio.to_thread(_cli, "doctor", "--database-url", pair.url)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "WARN  standby: asynchronous standby (standby1;" in done.stdout
        assert "a failover to it can lose acknowledged writes" in done.stdout
    finally:
        await asyncio.to_thread(pair.primary.psql, "ALTER SYSTEM RESET synchronous_standby_names")
        await asyncio.to_thread(pair.primary.psql, "SELECT pg_reload_conf()")

    async def synchronous() -> bool:
        state = await asyncio.to_thread(
            pair.primary.psql, "SELECT string_agg(sync_state, ',') FROM pg_stat_replication"
        )
        return state == "sync"

    await eventually(synchronous, 10)


async def _read_only_primary(client: Client, auth: dict[str, str], pair: PgPair) -> None:
    """The server the pools are on stops taking writes (as a demoted node would): a write gets
    503 with Retry-After, every session of the service on it is dropped (the pool's and the
    projection runners'; new ones are refused by target_session_attrs=read-write), and once it
    takes writes again the service is back without a restart."""
    sessions = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'scimledger:%'"
    )
    assert int(await asyncio.to_thread(pair.primary.psql, sessions)) > 0
    await asyncio.to_thread(
        pair.primary.psql, "ALTER SYSTEM SET default_transaction_read_only = on"
    )
    await asyncio.to_thread(pair.primary.psql, "SELECT pg_reload_conf()")
    try:
        late = await _write(
            client, "user", "POST", "/scim/v2/Users", entra_user("ro@x.com"), auth
        )
        assert late.status == 503 and late.retry_after == "1", late

        async def dropped() -> bool:
            return int(await asyncio.to_thread(pair.primary.psql, sessions)) == 0

        try:
            await eventually(dropped, 10)
        except AssertionError:
            left = await asyncio.to_thread(
                pair.primary.psql,
                "SELECT string_agg(pid || ' ' || application_name || ' ' || state || ' '"
                " || state_change::text || ' ' || left(query, 60),"
                " ' | ')"
                " FROM pg_stat_activity WHERE application_name LIKE 'scimledger:%'",
            )
            raise AssertionError(
                f"sessions left on the read-only server: {left}; {_pool_holders(client)}"
            ) from None
    finally:
        await asyncio.to_thread(
            pair.primary.psql, "ALTER SYSTEM RESET default_transaction_read_only"
        )
        await asyncio.to_thread(pair.primary.psql, "SELECT pg_reload_conf()")

    async def writable() -> bool:
        again = await _write(
            client, "user", "POST", "/scim/v2/Users", entra_user(f"{uuid.uuid4()}@x.com"), auth
        )
        return again.status == 201

    await eventually(writable, 10)


def _pool_holders(client: Client) -> str:
    """The service's pool as asyncpg holds it (for a failure's message): each holder's backend
    pid, whether it is in use, its generation against the pool's (expire_connections)."""
    pool = client.server.app[DATABASE].pool
    holders = [
        (h._con.get_server_pid() if h._con is not None else None, h._in_use is not None,
         h._generation)
        for h in pool._holders
    ]  # fmt: skip
    return f"pool generation {pool._generation}, holders {holders}, free {pool._queue.qsize()}"


async def _failover(pair: PgPair, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url=pair.url,
        pool_min=2,
        pool_max=20,
        db_connect_timeout=2.0,
        db_command_timeout=5.0,
        rate_limit=0,
        max_concurrent_per_token=0,
        runner_standby_interval=0.5,
    )
    async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as client:
        conn = await asyncpg.connect(pair.url)
        try:
            issued = await create_tenant(conn, "acme")
        finally:
            await conn.close()
        auth = {"Authorization": f"Bearer {issued.token}"}
        groups = []
        for g in range(GROUPS):
            r = await client.post(
                "/scim/v2/Groups",
                data=orjson.dumps({"schemas": [GROUP], "displayName": f"G{g}"}),
                headers={**auth, "Content-Type": SCIM},
            )
            assert r.status == 201, await r.text()
            groups.append((await r.json(content_type=None))["id"])

        await _read_only_primary(client, auth, pair)

        outcomes: list[Outcome] = []
        members: list[tuple[str, str]] = []
        stop = asyncio.Event()
        writers = [
            asyncio.create_task(_writer(client, auth, groups, n, stop, outcomes, members))
            for n in range(WRITERS)
        ]
        try:
            await asyncio.sleep(LOAD_BEFORE_KILL)
            killed = time.monotonic()
            await asyncio.to_thread(pair.kill_primary)
            await asyncio.sleep(DETECTION)
            # What the standby replayed, just before it is promoted: the highest transaction
            # id of any committed event (acknowledged writes are all here: synchronous).
            replayed_xid = int(
                pair.standby.psql("SELECT coalesce(max(transaction_id), 0) FROM stored_events")
            )
            await asyncio.to_thread(pair.promote)
            promoted = time.monotonic()

            async def acknowledged_again() -> bool:
                return any(o.started >= promoted and 200 <= o.status < 300 for o in outcomes)

            with contextlib.suppress(AssertionError):  # asserted below, with the figures
                await eventually(acknowledged_again, BACK_WITHIN + 5)
            await asyncio.sleep(LOAD_AFTER_BACK)
        finally:
            stop.set()
            await asyncio.gather(*writers)

        # What clients saw: 2xx or 503 (a SCIM Error with Retry-After), nothing else.
        unexpected = [(o.kind, o.status, o.body[:300]) for o in outcomes
                      if not (200 <= o.status < 300 or o.status == 503)]
        assert not unexpected, unexpected
        unavailable = [o for o in outcomes if o.status == 503]
        for o in unavailable:
            assert o.retry_after is not None and o.retry_after.isdigit(), o
            body = orjson.loads(o.body)
            assert body["schemas"] == [ERROR] and body["status"] == "503", body
        back = min(
            (o.ended for o in outcomes if o.started >= promoted and 200 <= o.status < 300),
            default=None,
        )
        assert back is not None, "no write acknowledged after the promotion"
        window = {
            "after_kill": round(back - killed, 3),
            "promoted_after_kill": round(promoted - killed, 3),
            "after_promotion": round(back - promoted, 3),
            "unavailable_503": len(unavailable),
            "acknowledged": sum(1 for o in outcomes if 200 <= o.status < 300),
        }
        print("failover window", orjson.dumps(window).decode(), file=sys.stderr)
        if os.environ.get("SCIMLEDGER_FAILOVER_LOG"):
            log_file = Path(os.environ["SCIMLEDGER_FAILOVER_LOG"])
            await asyncio.to_thread(_append_line, log_file, orjson.dumps(window).decode())
        assert back - promoted <= BACK_WITHIN, window

        conn = await asyncpg.connect(pair.standby.dsn)  # the new primary
        try:
            # Every acknowledged write is there.
            created = [o.target for o in outcomes if o.kind == "user" and o.status == 201]
            found = await conn.fetchval(
                "SELECT count(*) FROM scim_users WHERE id = ANY($1::uuid[])", created
            )
            assert found == len(created) and created
            pairs = await conn.fetch(
                "SELECT group_id::text, member_id::text FROM scim_group_members"
                " WHERE tenant_id = $1",
                issued.tenant_id,
            )
            assert set(members) <= {(r[0], r[1]) for r in pairs}

            # The provisioning log has an entry for every request answered, 503s included
            # (queued in memory while the database was away, written once it was back).
            answered = {o.request_id for o in outcomes if o.request_id}
            assert len(answered) == len(outcomes)

            async def logged() -> set[str]:
                rows = await conn.fetch(
                    "SELECT request_id FROM stored_events"
                    " WHERE topic LIKE 'domain.request:%' AND request_id = ANY($1::text[])",
                    list(answered),
                )
                return {r[0] for r in rows}

            async def all_logged() -> bool:
                return not answered - await logged()

            with contextlib.suppress(AssertionError):
                await eventually(all_logged, 20)
            missing = answered - await logged()
            assert not missing, f"{len(missing)} requests missing from the provisioning log"

            # Transaction ids continue from the standby's replayed state: every event written
            # after the promotion sorts after every event the old primary committed, so the
            # followers' (transaction_id, notification_id) order and xmin barrier stay valid.
            late = [o.request_id for o in outcomes if o.started >= promoted and o.request_id]
            first_new = await conn.fetchval(
                "SELECT min(transaction_id) FROM stored_events WHERE request_id = ANY($1::text[])",
                late,
            )
            assert first_new is not None and first_new > replayed_xid, (first_new, replayed_xid)
            xmin = await conn.fetchval(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
            )
            assert xmin > replayed_xid

            # The asynchronous audit projection caught up on the new primary: one entry per
            # request's transaction, none skipped, none twice.
            async def audit_behind() -> int:
                return int(
                    await conn.fetchval(
                        "SELECT count(*) FROM (SELECT DISTINCT transaction_id FROM stored_events)"
                        " e WHERE NOT EXISTS (SELECT 1 FROM audit_entries a"
                        " WHERE a.transaction_id = e.transaction_id)"
                    )
                )

            async def audit_caught_up() -> bool:
                return await audit_behind() == 0

            await eventually(audit_caught_up, 20)
            entries = await conn.fetch(
                "SELECT change_id, array_agg(status ORDER BY status) AS statuses,"
                " array_agg(http_status ORDER BY status) AS http"
                " FROM audit_entries WHERE change_id = ANY($1::text[]) GROUP BY change_id",
                list(answered),
            )
            assert {r["change_id"] for r in entries} == answered
            status_of = {o.request_id: o.status for o in outcomes}
            for r in entries:
                if len(r["statuses"]) == 1:
                    continue
                # The one case of two entries: a write whose COMMIT was replicated while its
                # reply was lost with the old primary. The client got 503; the log says both.
                assert status_of[r["change_id"]] == 503, dict(r)
                assert r["statuses"] == ["failure", "success"] and r["http"][0] == 503, dict(r)
        finally:
            await conn.close()

    done = await asyncio.to_thread(_verify, pair.url)
    assert done.returncode == 0, done.stdout + done.stderr


async def test_queued_outcomes_are_bounded_and_dropped_ones_counted(fresh_dsn: str) -> None:
    """The queue of outcomes waiting for the database holds at most its limit: past it the
    oldest goes, counted in scimledger_outcomes_dropped_total, as are those still queued at
    shutdown. Once the database answers, what is queued is written, in order."""
    from infra import metrics
    from infra.eventstore import EventStore
    from service.outcomes import PendingOutcomes, QueuedOutcome
    from tests.conftest import database_on

    async with database_on(fresh_dsn) as db:
        async with db.pool.acquire() as conn:
            issued = await create_tenant(conn, "acme")
        # A database that does not answer: a real pool, closed (every acquire fails).
        gone = await create_pool_on(fresh_dsn)
        await gone.close()
        away = type(db)(dsn=fresh_dsn, pool=gone, store=EventStore(gone), embedded=None)

        def outcome(n: int) -> QueuedOutcome:
            return QueuedOutcome(
                uuid.uuid4(), issued.tenant_id, None, "failure",
                {"method": "POST", "path": "/scim/v2/Users", "status": 503}, None, f"r{n}",
            )

        dropped = metrics.OUTCOMES_DROPPED._value.get()
        pending = PendingOutcomes(limit=2, retry_interval=0.05)
        for n in range(3):
            pending.put(away, outcome(n))
        assert len(pending) == 2
        assert metrics.OUTCOMES_DROPPED._value.get() == dropped + 1
        await asyncio.sleep(0.2)  # still failing: nothing is lost meanwhile
        assert len(pending) == 2
        await pending.close(grace=0.1)
        assert len(pending) == 0
        assert metrics.OUTCOMES_DROPPED._value.get() == dropped + 3

        # With the database there, the queue drains in order.
        pending = PendingOutcomes(limit=10, retry_interval=0.05)
        for n in range(3, 6):
            pending.put(db, outcome(n))

        async def drained() -> bool:
            return len(pending) == 0

        await eventually(drained, 10)
        rows = await db.pool.fetch(
            "SELECT request_id FROM stored_events WHERE topic LIKE 'domain.request:%'"
            " ORDER BY notification_id"
        )
        assert [r[0] for r in rows] == ["r3", "r4", "r5"]
        await pending.close()


async def create_pool_on(dsn: str) -> asyncpg.Pool:
    from infra.database import create_pool

    return await create_pool(dsn, min_size=1, max_size=1)
