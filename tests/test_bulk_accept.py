"""A connection that opens with a large body goes to the bulk process as the front accepts it,
before the front reads a byte (service/bulk_accept.py); anything else is aiohttp's, which
hands a large body over from within the request, as before."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import psutil
import pytest

from infra.tenants import digest
from service.bulk_accept import large_body
from service.limits_cost import HeavyTokens
from tests.test_bulk import THRESHOLD, _big_user
from tests.test_bulk import _serve as serve_one
from tests.test_bulk_handoff import CLIENT, _exchange, _replies, _request, answered_posts
from tests.test_cli import _stop, _token
from tests.test_workers import bulk_of

MOST = 10 * THRESHOLD


def _head(*fields: str, line: str = "POST /scim/v2/Users HTTP/1.1") -> bytes:
    return "\r\n".join([line, "Host: x", *fields]).encode() + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "large"),
    [
        (_head(f"Content-Length: {THRESHOLD + 1}"), True),
        (_head(f"content-length:{THRESHOLD + 1}", "Content-Encoding: identity"), True),
        (_head(f"Content-Length: {MOST}", line="PATCH /scim/v2/Users/1 HTTP/1.0"), True),
        (_head(f"Content-Length: {THRESHOLD + 1}", line="PUT /scim/v2/Users/1 HTTP/1.1"), True),
        # A small body, one past the limit (aiohttp's 413), none.
        (_head(f"Content-Length: {THRESHOLD}"), False),
        (_head(f"Content-Length: {MOST + 1}"), False),
        (_head(), False),
        # Not a body method, or not HTTP/1.x.
        (_head(f"Content-Length: {MOST}", line="GET /scim/v2/Users HTTP/1.1"), False),
        (_head(f"Content-Length: {MOST}", line="post /scim/v2/Users HTTP/1.1"), False),
        (_head(f"Content-Length: {MOST}", line="POST /scim/v2/Users HTTP/2.0"), False),
        # The head not all there yet.
        (_head(f"Content-Length: {MOST}")[:-2], False),
        # Chunked, compressed, or anything a parser could read two ways: aiohttp's to judge.
        (_head(f"Content-Length: {MOST}", "Transfer-Encoding: chunked"), False),
        (_head(f"Content-Length: {MOST}", "Content-Encoding: gzip"), False),
        (_head(f"Content-Length: {MOST}", f"Content-Length: {MOST}"), False),
        (_head("Content-Length: +12345"), False),
        (_head("Content-Length: 1" + "0" * 40), False),
        (_head(f"Content-Length : {MOST}"), False),
        (_head(f"Content-Length: {MOST}", " folded"), False),
        (_head(f"Content-Length: {MOST}", "no colon"), False),
    ],
)
def test_which_heads_are_handed_over_at_accept(head: bytes, large: bool) -> None:
    assert large_body(head, THRESHOLD, MOST) is large
    assert large_body(head, THRESHOLD, MOST, HeavyTokens()) is large


@pytest.mark.parametrize(
    ("head", "handed"),
    [
        # A heavy token's small body, however its credentials are spelt.
        (_head("Content-Length: 10", "Authorization: Bearer heavy"), True),
        (_head("Content-Length: 10", "authorization:bearer  heavy "), True),
        (
            _head(
                "Authorization: Bearer heavy",
                "Content-Length: 1",
                line="PATCH /scim/v2/Users/1 HTTP/1.1",
            ),
            True,
        ),
        # Another token's, none, another scheme, two Authorization headers.
        (_head("Content-Length: 10", "Authorization: Bearer light"), False),
        (_head("Content-Length: 10"), False),
        (_head("Content-Length: 10", "Authorization: Basic heavy"), False),
        (
            _head("Content-Length: 10", "Authorization: Bearer heavy", "Authorization: Bearer x"),
            False,
        ),
        # Without a body, or not a body method, or a body past the limit: as for any token.
        (_head("Content-Length: 0", "Authorization: Bearer heavy"), False),
        (_head("Authorization: Bearer heavy"), False),
        (
            _head(
                "Content-Length: 10",
                "Authorization: Bearer heavy",
                line="GET /scim/v2/Users HTTP/1.1",
            ),
            False,
        ),
        (_head(f"Content-Length: {MOST + 1}", "Authorization: Bearer heavy"), False),
        (
            _head(
                "Content-Length: 10", "Authorization: Bearer heavy", "Transfer-Encoding: chunked"
            ),
            False,
        ),
    ],
)
def test_a_heavy_token_s_small_body_is_handed_over_at_accept(head: bytes, handed: bool) -> None:
    heavy = HeavyTokens()
    assert not large_body(head, THRESHOLD, MOST, heavy)  # nothing marked yet
    heavy.mark(digest("heavy"))
    assert large_body(head, THRESHOLD, MOST, heavy) is handed
    assert not large_body(head, THRESHOLD, MOST)  # a front without marks


async def _handoffs(http: aiohttp.ClientSession, port: int) -> dict[str, float]:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    prefix = "scimledger_bulk_handoffs_total{at="
    return {
        line[len(prefix) + 1 : line.index('"}')]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


async def _expecting(port: int, request: bytes) -> tuple[bytes, bytes]:
    """`request` sent as curl sends a large body: the head with `Expect: 100-continue`, the
    body once the server says to go on; the interim reply and the final one."""
    head, _, body = request.partition(b"\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(CLIENT, 0))
    try:
        writer.write(head + b"\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        writer.write(body)
        return interim, await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()


async def _split(port: int, request: bytes) -> bytes:
    """`request` with its head in two pieces, 0.3 s apart: the front sees half a head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(CLIENT, 0))
    try:
        writer.write(request[:20])
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(request[20:])
        return await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()


async def test_a_large_body_first_on_its_connection_is_handed_over_unread(fresh_dsn: str) -> None:
    proc, banner, port = await serve_one(fresh_dsn)
    token = _token(banner)
    post = lambda name: _request("POST", "/scim/v2/Users", token, _big_user(name))  # noqa: E731
    try:
        async with aiohttp.ClientSession() as http:
            # First on a new connection: handed over at accept, answered by the bulk process,
            # and the connection closes after its reply.
            raw, closed = await _exchange(port, post("first@contoso.com"))
            [(status, headers, body)] = _replies(raw)
            assert status == 201 and headers["connection"] == "close" and closed, body
            assert await _handoffs(http, port) == {"accept": 1.0}

            # After a small request on a kept-alive connection: from within the request.
            small = _request("GET", "/scim/v2/Users?count=1", token)
            raw, closed = await _exchange(port, small, post("second@contoso.com"))
            assert [r[0] for r in _replies(raw)] == [200, 201] and closed
            assert await _handoffs(http, port) == {"accept": 1.0, "request": 1.0}

            # As curl sends it (Expect: 100-continue, the body after the interim reply): the
            # head alone reaches the front, which hands it over; the bulk process says go on.
            interim, raw = await _expecting(port, post("curl@contoso.com"))
            assert interim.startswith(b"HTTP/1.1 100 Continue")
            assert [r[0] for r in _replies(raw)] == [201]
            assert await _handoffs(http, port) == {"accept": 2.0, "request": 1.0}

            # Half a head at first: aiohttp's, handed over from within the request.
            raw = await _split(port, post("split@contoso.com"))
            assert [r[0] for r in _replies(raw)] == [201]
            assert await _handoffs(http, port) == {"accept": 2.0, "request": 2.0}

            # A small body first on its connection stays on the front, kept alive.
            small_post = _request("POST", "/scim/v2/Users", token, orjson.dumps({"x": 1}))
            raw, closed = await _exchange(port, small_post)
            assert [r[0] for r in _replies(raw)] == [400] and not closed

            async with http.get(f"http://127.0.0.1:{port}/scim/v2/Users?count=0",
                                headers={"Authorization": f"Bearer {token}"}) as r:  # fmt: skip
                assert (await r.json())["totalResults"] == 4
        # No process keeps a descriptor of a connection handed over.
        [bulk] = bulk_of(proc.pid)
        for process in (psutil.Process(proc.pid), bulk):
            served = [c for c in process.net_connections("tcp") if c.laddr.port == port]
            assert [c.status for c in served] in ([], [psutil.CONN_LISTEN]), served
    finally:
        assert await _stop(proc) == 0
    assert proc.stderr is not None
    lines = [orjson.loads(line) for line in (await proc.stderr.read()).splitlines()]
    # One line per request, where it was answered; nothing went wrong on the way.
    assert answered_posts(lines) == [("bulk", 201)] * 4 + [("front", 400)]
    assert not [line for line in lines if line.get("level") in ("warning", "error", "critical")]
