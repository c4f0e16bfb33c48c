"""Poll delivery (RFC 8936): `POST /events/{stream}` with the stream's own `feed` token; and the
public keys that sign SETs, `GET /.well-known/jwks.json`.

Each poll first removes what the receiver acknowledges (`ack`) or reports as bad (`setErrs`),
then returns the oldest SETs still pending, in feed order. What is not acknowledged comes back
on the next poll, the same token with the same `jti` (at-least-once, in order). With nothing
pending and `returnImmediately` false the request waits, at most `FeedSettings.max_wait`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import orjson
import structlog
from aiohttp import web

from service.feeds.config import FEED_SETTINGS
from service.feeds.keys import jwks
from service.feeds.producer import ASYNC_COMMIT, FEED_CHANNEL, PRODUCER, count_delivered
from service.state import DATABASE, PRINCIPAL

log = structlog.get_logger("scimledger.feeds")
MAX_ACKS = 10_000  # jtis one poll may acknowledge (ack + setErrs)
MAX_EVENTS = 1000  # SETs one poll may return
DEFAULT_EVENTS = 100


class PollError(Exception):
    """RFC 8936 §2.4.4: an error response is 400 with `err` and `description` (the codes of
    RFC 8935 §2.3)."""

    def __init__(self, description: str, err: str = "invalid_request", status: int = 400) -> None:
        super().__init__(description)
        self.err = err
        self.status = status

    def response(self) -> web.Response:
        body = {"err": self.err, "description": str(self)}
        return web.Response(
            body=orjson.dumps(body), status=self.status, content_type="application/json"
        )


def _request(body: bytes) -> tuple[list[str], dict[str, Any], int, bool]:
    try:
        data = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError:
        raise PollError("the body is not JSON") from None
    if not isinstance(data, dict):
        raise PollError("the body must be a JSON object")
    ack = data.get("ack", [])
    errs = data.get("setErrs", {})
    if not isinstance(ack, list) or not all(isinstance(j, str) and len(j) <= 200 for j in ack):
        raise PollError("ack must be an array of jti strings")
    if not isinstance(errs, dict) or not all(isinstance(v, dict) for v in errs.values()):
        raise PollError('setErrs must map jti to {"err", "description"}')
    if len(ack) + len(errs) > MAX_ACKS:
        raise PollError(f"at most {MAX_ACKS} acknowledgements in one poll")
    max_events = data.get("maxEvents", DEFAULT_EVENTS)
    if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 0:
        raise PollError("maxEvents must be a non-negative integer")
    immediately = data.get("returnImmediately", False)
    if not isinstance(immediately, bool):
        raise PollError("returnImmediately must be true or false")
    return ack, errs, min(max_events, MAX_EVENTS), immediately


async def poll(request: web.Request) -> web.Response:
    try:
        return await _poll(request)
    except PollError as e:
        return e.response()


async def _poll(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    try:
        stream_id = uuid.UUID(request.match_info["stream"])
    except ValueError:
        raise PollError("no such stream", "invalid_request", 404) from None
    pool = request.app[DATABASE].pool
    row = await pool.fetchrow(
        "SELECT token_id, tenant_id FROM feed_streams WHERE id = $1 AND delivery = 'poll'",
        stream_id,
    )
    # RFC 8935 §2.3 codes: the same answer for a stream that is not there and one of another
    # token, so a token learns nothing of other streams.
    if (
        row is None
        or principal.role != "feed"
        or row["token_id"] != principal.token_id
        or row["tenant_id"] != principal.tenant_id
    ):
        raise PollError("this token may not poll this stream", "access_denied", 403)
    ack, errs, max_events, immediately = _request(await request.read())
    done = list(dict.fromkeys([*ack, *errs]))
    if done:
        async with pool.acquire() as conn:
            await _acknowledge(conn, stream_id, done)
        for jti, err in list(errs.items())[:100]:
            log.warning(
                "feed receiver reported a bad SET",
                stream=str(stream_id),
                jti=jti,
                err=str(err.get("err"))[:100],
                description=str(err.get("description"))[:300],
            )
    if max_events == 0:
        return _reply({}, False)
    deadline = time.monotonic() + (0 if immediately else FEED_SETTINGS.max_wait)
    producer = request.app.get(PRODUCER)
    while True:
        # Taken before the read: SETs stored after it set this event (this instance's
        # producer); another instance's, or under `serve` the bulk process's (wiring.py), are
        # seen at the next check.
        stored = producer.stored if producer is not None else None
        rows = await pool.fetch(
            "SELECT jti, token FROM feed_sets WHERE stream_id = $1 ORDER BY seq LIMIT $2",
            stream_id,
            max_events + 1,
        )
        if rows or time.monotonic() >= deadline:
            break
        wait = min(FEED_SETTINGS.poll_check, max(0.0, deadline - time.monotonic()))
        if stored is None:
            await asyncio.sleep(wait)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stored.wait(), wait)
    sets = {r["jti"]: r["token"] for r in rows[:max_events]}
    return _reply(sets, len(rows) > max_events)


class _NotTheOldest(Exception):
    """The acknowledged SETs are not exactly the oldest pending ones."""


async def _acknowledge(conn: Any, stream_id: uuid.UUID, done: list[str]) -> None:
    """Remove the SETs acknowledged (or refused). A consumer acknowledges what its last poll
    got, the oldest pending SETs: they go by the range of their seqs (adjacent entries of the
    primary key), checked to be exactly those jtis, instead of a probe of the jti index per
    SET at a random place (~2 µs of PostgreSQL per SET in a catch-up, bench.feeds). Anything
    else (a part, a jti acknowledged twice) is rolled back and removed by jti."""
    with contextlib.suppress(_NotTheOldest):
        async with conn.transaction():
            await conn.execute(ASYNC_COMMIT)  # see producer.py: lost, they are sent again
            gone = await conn.fetch(
                "WITH h AS (SELECT seq FROM feed_sets WHERE stream_id = $1 ORDER BY seq LIMIT $2)"
                " DELETE FROM feed_sets WHERE stream_id = $1"
                " AND seq BETWEEN (SELECT min(seq) FROM h) AND (SELECT max(seq) FROM h)"
                " RETURNING jti",
                stream_id,
                len(done),
            )
            if len(gone) != len(done) or {r[0] for r in gone} != set(done):
                raise _NotTheOldest
            await _delivered(conn, stream_id, len(gone))
            return
    async with conn.transaction():
        await conn.execute(ASYNC_COMMIT)
        removed = await conn.fetchval(
            "WITH d AS (DELETE FROM feed_sets WHERE stream_id = $1 AND jti = any($2::text[])"
            " RETURNING 1) SELECT count(*) FROM d",
            stream_id,
            done,
        )
        await _delivered(conn, stream_id, removed)


async def _delivered(conn: Any, stream_id: uuid.UUID, removed: int) -> None:
    """Count them; room in the outbox wakes the producer (of whichever instance) at commit."""
    if removed:
        await count_delivered(conn, stream_id, removed)
        await conn.execute("SELECT pg_notify($1, '')", FEED_CHANNEL)


def _reply(sets: dict[str, str], more: bool) -> web.Response:
    body = {"sets": sets, "moreAvailable": more}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def jwks_handler(request: web.Request) -> web.Response:
    async with request.app[DATABASE].pool.acquire() as conn:
        body = await jwks(conn)
    return web.Response(
        body=orjson.dumps(body),
        content_type="application/jwk-set+json",
        headers={"Cache-Control": "max-age=300"},
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/events/{stream}", poll)
    app.router.add_get("/.well-known/jwks.json", jwks_handler)
