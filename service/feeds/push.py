"""Push delivery (RFC 8935): each push stream's SETs POSTed, one at a time and in order, to its
one URL, by the instance that holds the producer's lead.

202 Accepted removes the SET (RFC 8935 §2.2). A 400 with an RFC 8935 §2.3 error body is the
receiver refusing that SET for good: it is logged and dropped (retrying the same bytes cannot
help). Anything else (a network error, a timeout, 5xx, another status) is retried, the same SET
first (order is kept), after an exponential backoff with jitter; once a stream has failed for
`failing_after` seconds it is marked failing (`feeds show`, /metrics, the log) and keeps being
retried. Each stream has its own task: a slow receiver holds up only its own stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from typing import Any

import aiohttp
import asyncpg
import structlog
from prometheus_client import Counter, Gauge

from domain.request import ProvisioningRequest
from infra.database import Database
from projections.runner import _wait
from service.feeds.config import FEED_SETTINGS
from service.feeds.producer import ASYNC_COMMIT, count_delivered
from service.feeds.targets import PinnedResolver, TargetRefused, check_resolved

log = structlog.get_logger("scimledger.feeds")

DELIVERED = Counter(
    "scimledger_feed_sets_delivered",
    "SETs a push receiver took: accepted (202) or refused for good (400 with an error).",
    ["delivery"],
)
PUSH_FAILURES = Counter(
    "scimledger_feed_push_failures", "Failed push attempts (network error, timeout, non-202)."
)
FAILING = Gauge(
    "scimledger_feed_streams_failing",
    "Push streams failing for longer than SCIMLEDGER_FEED_FAILING_AFTER seconds.",
    multiprocess_mode="max",
)
_REFUSAL_CODES = frozenset(
    {
        "invalid_request",
        "invalid_key",
        "invalid_issuer",
        "invalid_audience",
        "authentication_failed",
        "access_denied",
    }
)


_DATABASE_DOWN = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


PUSH_BATCH = 100  # SETs read at once; each is still POSTed alone, in order


def backoff(attempt: int) -> float:
    """Seconds before retry `attempt` (1, 2, …): doubling from retry_base up to retry_max,
    with jitter (half to all of it), so that receivers coming back are not hit in step."""
    delay = min(FEED_SETTINGS.retry_max, FEED_SETTINGS.retry_base * 2 ** min(attempt - 1, 30))
    return float(delay * random.uniform(0.5, 1.0))


class Pusher:
    """One task per active push stream, reconciled with the table every second."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.tasks: dict[uuid.UUID, asyncio.Task[None]] = {}
        self.failing: set[uuid.UUID] = set()
        self.resolver = PinnedResolver()

    async def run(self, stop: asyncio.Event, leading: Any) -> None:
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=FEED_SETTINGS.push_timeout),
            connector=aiohttp.TCPConnector(
                limit=100, resolver=self.resolver, use_dns_cache=False
            ),
        )
        try:
            while not stop.is_set():
                wanted: set[uuid.UUID] = set()
                if leading():
                    with contextlib.suppress(
                        OSError, asyncpg.PostgresError, asyncpg.InterfaceError
                    ):
                        rows = await self.db.pool.fetch(
                            "SELECT id FROM feed_streams WHERE delivery = 'push'"
                            " AND paused_at IS NULL"
                        )
                        wanted = {r[0] for r in rows}
                for stream_id in list(self.tasks):
                    if stream_id not in wanted or self.tasks[stream_id].done():
                        self.tasks.pop(stream_id).cancel()
                for stream_id in wanted - set(self.tasks):
                    self.tasks[stream_id] = asyncio.get_running_loop().create_task(
                        self._stream(stream_id, session, stop)
                    )
                FAILING.set(len(self.failing))
                await _wait(stop, 1.0)
        finally:
            for task in self.tasks.values():
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            await session.close()

    async def _stream(
        self, stream_id: uuid.UUID, session: aiohttp.ClientSession, stop: asyncio.Event
    ) -> None:
        pool = self.db.pool
        attempt = 0
        failing_since: float | None = None
        while not stop.is_set():
            try:
                stream = await pool.fetchrow(
                    "SELECT tenant_id, name, endpoint, paused_at, failing_since FROM feed_streams"
                    " WHERE id = $1",
                    stream_id,
                )
                if stream is None or stream["paused_at"] is not None:
                    return
                heads = await pool.fetch(
                    "SELECT seq, jti, token FROM feed_sets WHERE stream_id = $1"
                    " ORDER BY seq LIMIT $2",
                    stream_id,
                    PUSH_BATCH,
                )
            except _DATABASE_DOWN:
                await _wait(stop, 1.0)
                continue
            if not heads:
                await _wait(stop, 0.2)
                continue
            # One at a time and in order (RFC 8935 carries one SET per request); what was
            # accepted is removed in one statement after the run, so a crash in between
            # resends some (at-least-once), never skips one.
            done: list[int] = []
            outcome: tuple[str, str] | None = None
            try:
                # DNS rebinding: the connection goes to the addresses just vetted, not to what
                # the name resolves to a moment later (service/feeds/targets.py).
                self.resolver.pin(stream["endpoint"], await check_resolved(stream["endpoint"]))
            except TargetRefused as e:
                outcome = ("retry", f"refused target: {e}")
            else:
                for head in heads:
                    outcome = await self._post(session, stream["endpoint"], head["token"])
                    if outcome is not None and outcome[0] != "refused":
                        break
                    if outcome is not None:
                        log.warning(
                            "feed push receiver refused a SET",
                            stream=str(stream_id),
                            error=outcome[1],
                        )
                    done.append(head["seq"])
                    outcome = None
                    if stop.is_set():
                        break
            try:
                if done:
                    await self._delivered(stream_id, done)
                    attempt, failing_since = 0, None
                    if stream["failing_since"] is not None or stream_id in self.failing:
                        self.failing.discard(stream_id)
                        await pool.execute(
                            "UPDATE feed_streams SET failing_since = NULL, last_error = NULL"
                            " WHERE id = $1",
                            stream_id,
                        )
                        log.info("feed push stream recovered", stream=str(stream_id))
                if outcome is None:
                    continue
                attempt += 1
                PUSH_FAILURES.inc()
                now = time.monotonic()
                failing_since = failing_since or now
                error = outcome[1][:500]
                await pool.execute(
                    "UPDATE feed_sets SET attempts = attempts + 1 WHERE stream_id = $1"
                    " AND seq = $2",
                    stream_id,
                    heads[len(done)]["seq"],
                )
                if now - failing_since >= FEED_SETTINGS.failing_after and (
                    stream_id not in self.failing
                ):
                    self.failing.add(stream_id)
                    await pool.execute(
                        "UPDATE feed_streams SET failing_since = coalesce(failing_since, now()),"
                        " last_error = $2 WHERE id = $1",
                        stream_id,
                        error,
                    )
                    log.error("feed push stream failing", stream=str(stream_id), error=error)
                    await self._record_failing(stream_id, stream["tenant_id"], error)
            except _DATABASE_DOWN:
                pass
            await _wait(stop, backoff(max(attempt, 1)))

    async def _record_failing(self, stream_id: uuid.UUID, tenant_id: uuid.UUID, error: str) -> None:
        """A provisioning-log entry (a failed request of ours, as the audit log shows them):
        compliance officers see that a consumer stopped receiving changes, and since when."""
        change_id = uuid.uuid4().hex
        record = ProvisioningRequest.record(
            uuid.uuid4(),
            tenant_id,
            "failure",
            {
                "method": "POST",
                "path": f"/events/{stream_id}",
                "status": 502,
                "initiatedBy": "scimledger feeds (push)",
                "client": None,
                "targetType": None,
                "targetId": None,
                "clientRequestId": None,
                "durationMs": 0,
            },
            {"status": "502", "detail": f"push stream {stream_id} failing: {error}"[:500]},
        )
        with contextlib.suppress(*_DATABASE_DOWN):
            await self.db.store.append_now(tenant_id, record.collect_events(), change_id)

    async def _post(
        self, session: aiohttp.ClientSession, url: str, token: str
    ) -> tuple[str, str] | None:
        """None when accepted; ("refused", why) for a 400 with an RFC 8935 error; else
        ("retry", why)."""
        try:
            async with session.post(
                url,
                data=token.encode(),
                headers={
                    "Content-Type": "application/secevent+jwt",
                    "Accept": "application/json",
                },
                allow_redirects=False,
            ) as response:
                if response.status == 202:
                    return None
                body = await response.content.read(4096)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return ("retry", f"{type(e).__name__}: {e}")
        if response.status == 400:
            with contextlib.suppress(ValueError):
                import orjson

                err = orjson.loads(body)
                if isinstance(err, dict) and err.get("err") in _REFUSAL_CODES:
                    return ("refused", f"{err.get('err')}: {str(err.get('description'))[:300]}")
        return ("retry", f"HTTP {response.status}")

    async def _delivered(self, stream_id: uuid.UUID, seqs: list[int]) -> None:
        async with self.db.pool.acquire() as conn, conn.transaction():
            await conn.execute(ASYNC_COMMIT)  # see producer.py: lost, they are sent again
            removed = await conn.fetchval(
                "WITH d AS (DELETE FROM feed_sets WHERE stream_id = $1"
                " AND seq = any($2::bigint[]) RETURNING 1) SELECT count(*) FROM d",
                stream_id,
                seqs,
            )
            await count_delivered(conn, stream_id, removed)
        DELIVERED.labels("push").inc(len(seqs))
