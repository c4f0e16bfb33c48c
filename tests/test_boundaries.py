"""Bad bytes get a 4xx, never a 500: values PostgreSQL cannot hold (NUL, invalid UTF-8, a
bigint or a date out of its range) are refused where they come in, with the endpoint's own
error, nothing written and no stack trace in the log.

Invalid UTF-8 in a header cannot be sent by aiohttp's client: those requests go over a raw
socket.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog
from aiohttp.test_utils import TestClient

from infra.database import Database
from infra.tenants import IssuedToken
from tests.test_audit import audit_auth
from tests.test_cli import _serve, _stop, run
from tests.test_entra_users import create as create_user

Client = TestClient[Any, Any]
# A bound for a reply that never comes (an export that started streaming and then failed),
# so that such a bug fails the test instead of hanging it. Not a speed check.
NO_HANG = aiohttp.ClientTimeout(total=60)


def page_token(at: Any, txid: Any) -> str:
    """A `next` token shaped like the audit API's own (base64url of [activity_at, txid])."""
    return base64.urlsafe_b64encode(json.dumps([at, txid]).encode()).decode().rstrip("=")


# Each was a 500 (or, for an export, a reply that never ended) before the boundary checks.
BAD_FILTERS = [
    {"identity": "Ada\x00"},
    {"changeId": "\x00"},
    {"errorCode": "Entry\x00Conflict"},
    {"from": "0001-01-01T00:00:00+05:00"},  # year 0 in UTC
    {"to": "9999-12-31T23:59:59-05:00"},  # year 10000 in UTC
]
BAD_PAGE_TOKENS = [
    page_token("2026-01-01T00:00:00+00:00", 2**64),
    page_token("2026-01-01T00:00:00+00:00", -(2**63) - 1),
    page_token("2026-01-01T00:00:00+00:00", 1e300),
    page_token("2026-01-01T00:00:00+00:00", True),
    page_token("0001-01-01T00:00:00+05:00", 1),
    page_token("2026-01-01T00:00:00", 1),  # ours always carry the zone
]


@pytest.fixture
def log_lines() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def assert_no_stack_trace(logs: list[dict[str, Any]]) -> None:
    for line in logs:
        assert line["log_level"] not in ("error", "critical", "exception"), line
        assert "exc_info" not in line and "exception" not in line, line


async def event_count(database: Database) -> int:
    return int(await database.pool.fetchval("SELECT count(*) FROM stored_events"))


async def assert_scim_400(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.status == 400, await response.text()
    assert response.content_type == "application/scim+json"
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == "400" and body["scimType"] == "invalidValue", body
    return body


async def test_audit_api_refuses_what_postgres_cannot_hold(
    client: Client,
    auth: dict[str, str],
    database: Database,
    log_lines: list[dict[str, Any]],
) -> None:
    await create_user(client, auth)
    reader = await audit_auth(database)
    before = await event_count(database)
    for params in BAD_FILTERS:
        for endpoint in ("/audit/v1/entries", "/audit/v1/export"):
            r = await client.get(endpoint, params=params, headers=reader, timeout=NO_HANG)
            body = await assert_scim_400(r)
            assert next(iter(params)) in body["detail"]
    for token in BAD_PAGE_TOKENS:
        r = await client.get("/audit/v1/entries", params={"next": token}, headers=reader)
        assert (await assert_scim_400(r))["detail"] == "next is not a page token of this API"
    # The same values, well-formed, still work.
    r = await client.get(
        "/audit/v1/entries",
        params={"identity": "Ada", "from": "0001-01-01T00:00:00Z", "to": "9999-12-31T00:00Z"},
        headers=reader,
    )
    assert r.status == 200, await r.text()
    assert await event_count(database) == before
    assert_no_stack_trace(log_lines)


async def test_audit_pages_refuse_what_postgres_cannot_hold(
    client: Client, database: Database, tenant: IssuedToken, log_lines: list[dict[str, Any]]
) -> None:
    reader = await audit_auth(database)
    token = reader["Authorization"].removeprefix("Bearer ")
    r = await client.post("/audit/sign-in", data={"token": token}, allow_redirects=False)
    assert r.status == 303
    pages = [{k: v, "range": "custom"} for params in BAD_FILTERS for k, v in params.items()]
    for params in pages:
        for page in ("/audit/", "/audit/export"):
            r = await client.get(page, params=params, timeout=NO_HANG)
            assert r.status == 400, (page, params, r.status)
            assert r.content_type == "text/html"
            assert 'class="notice error"' in await r.text()
    for next_token in BAD_PAGE_TOKENS:
        r = await client.get("/audit/", params={"next": next_token})
        assert r.status == 400 and "next is not a page token" in await r.text()
    assert_no_stack_trace(log_lines)


async def raw_request(client: Client | int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request as bytes (headers aiohttp's client will not send) to the test
    client's server or a port; the status and the body of the reply."""
    host, port = ("127.0.0.1", client) if isinstance(client, int) else (client.host, client.port)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        length = f"Content-Length: {len(body)}\r\n".encode() if body else b""
        writer.write(head + b"Host: localhost\r\nConnection: close\r\n" + length + b"\r\n" + body)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), NO_HANG.total)
    finally:
        writer.close()
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_invalid_utf8_credentials_are_401_not_500(
    client: Client, tenant: IssuedToken, log_lines: list[dict[str, Any]]
) -> None:
    for token in (b"\xff\xfe", tenant.token.encode() + b"\xff", b"\xed\xa0\x80", b"caf\xc3\xa9"):
        for path in (b"/scim/v2/Users", b"/audit/v1/entries"):
            status, body = await raw_request(
                client, b"GET " + path + b" HTTP/1.1\r\nAuthorization: Bearer " + token + b"\r\n"
            )
            assert status == 401, (path, token, body)
            assert json.loads(body)["detail"] == "A valid bearer token is required"
    # The audit pages' session cookie: the sign-in form, not a 500.
    for cookie in (b"\xff\xfe", b"\xed\xa0\x80" * 3):
        status, body = await raw_request(
            client,
            b"GET /audit/entries/x HTTP/1.1\r\nCookie: scimledger_audit=" + cookie + b"\r\n",
        )
        assert status == 401 and b'name="token"' in body, body[:200]
    assert_no_stack_trace(log_lines)


async def test_sign_in_refuses_an_origin_or_next_it_cannot_use(
    client: Client, database: Database, tenant: IssuedToken, log_lines: list[dict[str, Any]]
) -> None:
    reader = await audit_auth(database)
    token = reader["Authorization"].removeprefix("Bearer ").encode()
    form = b"token=" + token
    head = b"POST /audit/sign-in HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    status, _ = await raw_request(client, head + b"Origin: http://[\r\n", form)
    assert status == 403
    status, _ = await raw_request(
        client, head.replace(b"sign-in", b"sign-out") + b"Origin: http://[\r\n"
    )
    assert status == 403
    # A `next` that cannot be a Location header (CR LF, NUL) goes to the log's first page.
    for target in ("/audit/\r\nSet-Cookie: x=y", "/audit/\x00", "//["):
        r = await client.post(
            "/audit/sign-in", data={"token": token.decode(), "next": target}, allow_redirects=False
        )
        assert (r.status, r.headers["Location"]) == (303, "/audit/")
    assert_no_stack_trace(log_lines)


async def test_cli_refuses_arguments_postgres_cannot_hold(
    fresh_dsn: str, tenant: IssuedToken, tmp_path: Path
) -> None:
    not_utf8 = os.fsdecode(b"Ada\xff")  # how Python hands over an argv byte that is not UTF-8
    for args in (
        ("--identity", not_utf8),
        ("--change-id", not_utf8),
        ("--error-code", not_utf8),
        ("--tenant", not_utf8),
        ("--from", "0001-01-01T00:00:00+05:00"),
        ("--next", page_token("2026-01-01T00:00:00+00:00", 2**64)),
    ):
        tenant_args = () if args[0] == "--tenant" else ("--tenant", "acme")
        code, _, err = await run("audit", "list", *tenant_args, *args, "--database-url", fresh_dsn)
        assert code == 2, (args, code, err)
        assert err.startswith("scimledger: error:") and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
    code, _, err = await run("audit", "list", "--tenant", "acme", "--database-url", fresh_dsn)
    assert code == 0, err
    # A file name is the file system's business: any bytes it takes.
    output = tmp_path / os.fsdecode(b"log-\xe9.csv")
    code, _, err = await run(
        "audit",
        "export",
        "--tenant",
        "acme",
        "--format",
        "csv",
        "--output",
        str(output),
        "--database-url",
        fresh_dsn,
    )
    assert code == 0 and output.read_text().startswith("id,"), err


async def test_requests_the_http_parser_refuses_leave_one_log_line_each(fresh_dsn: str) -> None:
    """Invalid UTF-8 in the request line, a line over 8 KiB, a NUL in a header: aiohttp's
    parser answers 400 before any handler runs, and logged each with a traceback."""
    refused = [
        b"GET /scim/v2/Users/\xff\xfe HTTP/1.1\r\n",
        b"GET /scim/v2/Users?filter=" + b"x" * 9000 + b" HTTP/1.1\r\n",
        b"GET /scim/v2/Users HTTP/1.1\r\nX-Request-Id: a\x00b\r\n",
    ]
    proc, _, port = await _serve("--database-url", fresh_dsn, "--workers", "1")
    try:
        for head in refused:
            status, _ = await raw_request(port, head)
            assert status == 400, head[:40]
    finally:
        assert await _stop(proc) == 0
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    assert "Traceback" not in err, err
    lines = [json.loads(line) for line in err.splitlines()]  # structlog's JSON, one per line
    parser = [line for line in lines if line["event"] == "request refused by the HTTP parser"]
    assert [line["status"] for line in parser] == [400] * len(refused), lines
    assert "x" * 100 not in err  # what the client sent is not echoed


async def test_a_body_the_client_cuts_short_is_its_failure_not_the_databases(
    fresh_dsn: str,
) -> None:
    """A client that closes its connection halfway through its body: logged, counted and
    recorded as a 400 invalidSyntax of the client's, not as the database unavailable (503)."""
    from service.middlewares import CLIENT_GONE
    from tests.test_bulk import THRESHOLD, _big_user
    from tests.test_bulk import _serve as serve_one
    from tests.test_bulk_handoff import answered_posts
    from tests.test_cli import _token

    proc, banner, port = await serve_one(fresh_dsn)
    token = _token(banner)
    # A small body stays on the front; a large one goes to the bulk process.
    bodies = [b'{"userName": "cut@contoso.com", "active": true}', _big_user("cut2@contoso.com")]
    assert len(bodies[0]) < THRESHOLD < len(bodies[1])
    try:
        for body in bodies:
            head = (
                "POST /scim/v2/Users HTTP/1.1\r\nHost: x\r\nContent-Type: application/scim+json\r\n"
                f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head.encode() + body[: len(body) // 2])
            await writer.drain()
            await asyncio.sleep(0.3)  # the server is reading the body by now
            writer.close()
            await writer.wait_closed()
        db = await asyncpg.connect(fresh_dsn)
        try:
            for _ in range(100):  # the provisioning log's projection catches up
                entries = await db.fetch(
                    "SELECT status, http_status, error_code, error_reason FROM audit_entries"
                )
                if len(entries) == 2:
                    break
                await asyncio.sleep(0.1)
            assert await db.fetchval("SELECT count(*) FROM scim_users") == 0  # nothing written
        finally:
            await db.close()
    finally:
        assert await _stop(proc) == 0
    assert [tuple(e) for e in entries] == [("failure", 400, "InvalidInput", CLIENT_GONE)] * 2
    assert proc.stderr is not None
    lines = [json.loads(line) for line in (await proc.stderr.read()).splitlines()]
    assert answered_posts(lines) == [("bulk", 400), ("front", 400)], lines
    assert not [line for line in lines if line["event"] == "database unavailable"]
