"""The front hands a large body's connection to the bulk process (service/bulk_handoff.py): the
client gets one reply, from the bulk process, on its own connection, which then closes."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import aiohttp
import asyncpg
import orjson
import psutil

from service.bulk import CLIENT_HEADER
from tests.test_bulk import THRESHOLD, _big_user, _posted
from tests.test_bulk import _serve as serve_one
from tests.test_cli import _serve as serve
from tests.test_cli import _stop, _token
from tests.test_entra_users import entra_user
from tests.test_workers import bulk_of

CLIENT = "127.0.0.2"  # a loopback address of its own, to tell the client's address apart


def _request(method: str, path: str, token: str, body: bytes = b"", **extra: str) -> bytes:
    headers = {
        "Host": "localhost",
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/scim+json",
        "Content-Length": str(len(body)),
        "Connection": "keep-alive",
        **extra,
    }
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


def _replies(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every HTTP/1.1 reply in `raw` (bodies by Content-Length), and nothing left over."""
    replies = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = int(headers["content-length"])
        replies.append((int(status_line.split()[1]), headers, rest[:length]))
        raw = rest[length:]
    return replies


async def _exchange(port: int, *requests: bytes) -> tuple[bytes, bool]:
    """Send `requests` on one keep-alive connection from CLIENT, each once the one before is
    answered; all the bytes that came back until the server closed the connection (True) or
    kept it open for a second more (False)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(CLIENT, 0))
    try:
        received = b""
        for request in requests:
            writer.write(request)
            await writer.drain()
            reply = b""
            while not _complete(reply):
                try:
                    data = await asyncio.wait_for(reader.read(1 << 16), 15)
                except TimeoutError:
                    return received + reply, False
                if not data:
                    return received + reply, True
                reply += data
            received += reply
        try:
            closed = await asyncio.wait_for(reader.read(1), 1) == b""
        except TimeoutError:
            closed = False
        return received, closed
    finally:
        writer.close()


def answered_posts(lines: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """The access-log lines of POSTs (`serve`'s stderr, parsed): where each was answered (the
    bulk process, or a front) and its status, sorted."""
    return sorted(
        (line.get("process", "front"), line["status"])
        for line in lines
        if line["event"] == "request" and line["method"] == "POST"
    )


def _complete(raw: bytes) -> bool:
    """Whether `raw` ends with a whole reply (its body as long as its Content-Length)."""
    if b"\r\n\r\n" not in raw:
        return False
    try:
        return bool(_replies(raw))
    except (KeyError, ValueError, IndexError):
        return False


async def test_a_handed_off_connection_gets_one_reply_and_closes(fresh_dsn: str) -> None:
    proc, banner, port = await serve_one(fresh_dsn)
    token = _token(banner)
    db = await asyncpg.connect(fresh_dsn)
    try:
        # A keep-alive client sends a large body: one reply, from the bulk process, asking for
        # the connection's close, and the connection closes after it (nothing from the front).
        big = _big_user("handed@contoso.com")
        # A header only a front may set: a client's own is not believed.
        forged = {CLIENT_HEADER: "203.0.113.9", "X-Request-Id": "handed-1"}
        raw, closed = await _exchange(
            port, _request("POST", "/scim/v2/Users", token, big, **forged)
        )
        [(status, headers, body)] = _replies(raw)
        assert status == 201, body
        assert headers["connection"] == "close" and closed
        assert headers["content-type"].startswith("application/scim+json")
        assert len(orjson.loads(body)["emails"]) == 60
        request_id = headers["x-request-id"]
        # The client's address is its socket's, in the provisioning log's record.
        record = await db.fetchval(
            "SELECT state FROM stored_events"
            " WHERE request_id = $1 AND topic LIKE 'domain.request:%'",
            request_id,
        )
        assert record is not None
        assert f'"{CLIENT}"'.encode() in bytes(record) and b"203.0.113.9" not in bytes(record)

        # The client continues on a new connection; a small body stays on the front, whose
        # connection stays open (it asked for keep-alive).
        small = orjson.dumps(entra_user("small@contoso.com"))
        raw, closed = await _exchange(port, _request("POST", "/scim/v2/Users", token, small))
        [(status, headers, _)] = _replies(raw)
        assert status == 201 and headers.get("connection") != "close" and not closed

        # Bad input on a handed-off connection: the same SCIM error, nothing written.
        bad = _big_user("bad@contoso.com").replace(b'"active":true', b'"active":"sometimes"')
        raw, closed = await _exchange(port, _request("POST", "/scim/v2/Users", token, bad))
        [(status, headers, body)] = _replies(raw)
        assert status == 400 and orjson.loads(body)["scimType"] == "invalidValue" and closed
        assert await db.fetchval("SELECT count(*) FROM scim_users") == 2

        # A request pipelined behind a handed-off one is not answered (the connection closes
        # after the first reply; the client retries it, RFC 9112 §9.3.2), never answered twice.
        again = _big_user("pipelined@contoso.com")
        raw, closed = await _exchange(
            port,
            _request("POST", "/scim/v2/Users", token, again)
            + _request("GET", "/scim/v2/Users?count=1", token),
        )
        [(status, _, _)] = _replies(raw)
        assert status == 201 and closed

        async with aiohttp.ClientSession() as http:
            # Counted once, where the client was answered (the bulk process, whose figures the
            # front's /metrics adds).
            assert await _posted(http, port) == {"201": 3, "400": 1}

            # The bulk process takes no connection (stopped): the front answers 503 with
            # Retry-After and closes the connection; and the bulk process, once it runs again,
            # does not answer the request a second time.
            [bulk] = bulk_of(proc.pid)
            os.kill(bulk.pid, signal.SIGSTOP)
            try:
                late = _big_user("late@contoso.com")
                raw, closed = await _exchange(port, _request("POST", "/scim/v2/Users", token, late))
            finally:
                os.kill(bulk.pid, signal.SIGCONT)
            [(status, headers, body)] = _replies(raw)
            # (Closed once the bulk process runs again: the descriptor in flight to it holds
            # the connection open until then; the reply already said it closes.)
            assert status == 503 and headers["retry-after"] == "1", body
            assert headers["connection"] == "close"
            assert orjson.loads(body)["status"] == "503"
            again = _big_user("later@contoso.com")
            raw, closed = await _exchange(port, _request("POST", "/scim/v2/Users", token, again))
            assert [r[0] for r in _replies(raw)] == [201] and closed
            assert await db.fetchval("SELECT count(*) FROM scim_users") == 4
            assert (await _posted(http, port)) == {"201": 4, "400": 1, "503": 1}
    finally:
        await db.close()
        assert await _stop(proc) == 0
    assert proc.stderr is not None
    lines = [orjson.loads(line) for line in (await proc.stderr.read()).splitlines()]
    # One line per request, written where it was answered.
    assert answered_posts(lines) == [("bulk", 201)] * 3 + [
        ("bulk", 400),
        ("front", 201),
        ("front", 503),
    ]
    assert not [line for line in lines if line.get("level") in ("error", "critical")]


async def test_several_workers_hand_off_to_their_bulk_process(fresh_dsn: str) -> None:
    env = {"SCIMLEDGER_BULK_BODY_BYTES": str(THRESHOLD)}
    proc, banner, port = await serve("--workers", "2", "--database-url", fresh_dsn, env=env)
    token = _token(banner)
    try:
        [bulk] = bulk_of(proc.pid)
        for i in range(4):  # on either worker
            raw, closed = await _exchange(
                port, _request("POST", "/scim/v2/Users", token, _big_user(f"w{i}@contoso.com"))
            )
            [(status, headers, body)] = _replies(raw)
            assert status == 201 and headers["connection"] == "close" and closed, body
        # Counted once each, where they were answered (the bulk process, whose figures the
        # workers' shared directory holds).
        async with aiohttp.ClientSession() as http:
            assert await _posted(http, port) == {"201": 4}
        # No process keeps a descriptor of a connection that was handed off.
        for process in (psutil.Process(proc.pid), bulk):
            served = [c for c in process.net_connections("tcp") if c.laddr.port == port]
            assert [c.status for c in served] in ([], [psutil.CONN_LISTEN]), served
    finally:
        assert await _stop(proc) == 0
