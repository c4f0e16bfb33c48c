"""An audit export is returned in pages of at most SCIMLEDGER_MAX_EXPORT_ENTRIES entries (and
SCIMLEDGER_MAX_EXPORT_BYTES of their stored values), each naming the next in its `Link`
header; the pages one after the other are exactly the whole export, and the CLI (and the web
page, tests/test_audit_web.py) follow them into one file.

The limits are set small here (3 entries; or 1 byte, so that every page holds one entry).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from infra.config import Settings
from infra.database import Database
from infra.tenants import IssuedToken, create_tenant, issue_token
from service.app import create_app
from service.audit_export import CSV_COLUMNS, csv_line, csv_row, neutralise
from service.state import SETTINGS
from tests.test_audit import audit_auth, settled
from tests.test_cli import run
from tests.test_entra_users import create as create_user
from tests.test_entra_users import entra_user, headers, patch

Client = TestClient[Any, Any]

MAX_ENTRIES = 3
_LINK = re.compile(r'^<([^>]+)>; rel="next"$')


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace(settings, max_export_entries=MAX_ENTRIES)


async def pages(
    client: Client, reader: dict[str, str], url: str, between: Any = None
) -> list[bytes]:
    """Every page of an export, following each reply's Link (calling `between` in between)."""
    out: list[bytes] = []
    next_url: str | None = url
    while next_url is not None:
        r = await client.get(next_url, headers=reader)
        assert r.status == 200, await r.text()
        out.append(await r.read())
        link = r.headers.get("Link")
        next_url = None
        if link is not None:
            found = _LINK.match(link)
            assert found, link
            next_url = found.group(1)
            assert next_url.startswith(url.split("?")[0] + "?")
            if between is not None:
                await between()
        assert len(out) < 100, "the pages never end"
    return out


async def some_history(client: Client, auth: dict[str, str]) -> list[dict[str, Any]]:
    """Eight entries: users created and changed, and a request that failed."""
    names = ["p0@contoso.com", "p1@contoso.com", "p2@contoso.com", "p3@contoso.com", "=p4"]
    made = [await create_user(client, auth, user_name=name) for name in names]
    await patch(client, auth, made[0]["id"], {"op": "Replace", "path": "title", "value": "=1+2"})
    await patch(client, auth, made[1]["id"], {"op": "Replace", "path": "active", "value": False})
    r = await client.post(
        "/scim/v2/Users", json=entra_user("p1@contoso.com"), headers=headers(auth)
    )
    assert r.status == 409
    return made


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
async def test_pages_join_to_the_whole_export_under_concurrent_writes(
    client: Client,
    auth: dict[str, str],
    database: Database,
    tenant: IssuedToken,
    fresh_dsn: str,
    tmp_path: Path,
    fmt: str,
) -> None:
    reader = await audit_auth(database)
    await some_history(client, auth)
    listed = (await settled(client, reader))["entries"]
    assert len(listed) == 8
    # The CLI follows the same pages (its own process, the same limit) into one file.
    whole = tmp_path / f"log.{fmt}"
    code, _, err = await run(
        "audit", "export", "--tenant", "acme", "--format", fmt, "--output", str(whole),
        "--database-url", fresh_dsn, env={"SCIMLEDGER_MAX_EXPORT_ENTRIES": str(MAX_ENTRIES)},
    )  # fmt: skip
    assert code == 0, err
    assert "exported 8 entries" in err
    expected = whole.read_bytes()

    written = 0

    async def write() -> None:
        """A write between two pages: its entry is newer than the export's first page."""
        nonlocal written
        written += 1
        await create_user(client, auth, user_name=f"late{written}@contoso.com")
        await settled(client, reader)

    got = await pages(client, reader, f"/audit/v1/export?format={fmt}", between=write)
    assert written == 2  # pages of 3, 3 and 2 entries
    assert b"".join(got) == expected  # no gap, no duplicate, no entry written meanwhile
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(b"".join(got).decode())))
        assert rows[0] == list(CSV_COLUMNS)  # one header, on the first page only
        assert [r[0] for r in rows[1:]] == [e["id"] for e in listed]
        assert [len(list(csv.reader(io.StringIO(p.decode())))) for p in got] == [4, 3, 2]
        assert ",'=p4," in b"".join(got).decode()  # the CSV injection rule holds on every page
    else:
        entries = [orjson.loads(line) for line in b"".join(got).splitlines()]
        assert entries == listed
        assert [len(p.splitlines()) for p in got] == [3, 3, 2]


async def test_a_byte_budget_ends_a_page_after_its_first_entry(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    reader = await audit_auth(database)
    await some_history(client, auth)
    listed = (await settled(client, reader))["entries"]
    app = client.server.app
    assert app is not None
    # A second app on the same database, whose exports start no entry past their first byte.
    settings = replace(app[SETTINGS], max_export_entries=100, max_export_bytes=1)
    async with TestClient(TestServer(create_app(settings, database), host="127.0.0.1")) as tiny:
        got = await pages(tiny, reader, "/audit/v1/export?format=jsonl&status=success")
        named = await pages(tiny, reader, "/audit/v1/export?format=jsonl&identity=P1")
    successes = [e for e in listed if e["provisioningStatusInfo"]["status"] == "success"]
    assert [orjson.loads(p) for p in got] == successes  # one entry a page, the filter kept
    r = await client.get("/audit/v1/entries?identity=P1", headers=reader)
    assert [orjson.loads(p) for p in named] == (await r.json())["entries"]
    assert len(named) == 2  # p1's create and update (its failed duplicate names no target)


async def test_forged_or_foreign_page_tokens_are_400(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    reader = await audit_auth(database)
    await some_history(client, auth)
    await settled(client, reader)
    async with database.pool.acquire() as conn:
        await create_tenant(conn, "fabrikam")
        other = await issue_token(conn, "fabrikam", "audit", "other")
    # A real token of acme's export is no token for fabrikam's.
    r = await client.get("/audit/v1/export?format=jsonl", headers=reader)
    found = _LINK.match(r.headers["Link"])
    assert found
    foreign = found.group(1)
    r = await client.get(foreign, headers={"Authorization": f"Bearer {other.token}"})
    assert r.status == 400, await r.text()

    def token(value: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    forged = [
        "%%%",
        "bm90IGpzb24",
        token(str(uuid.uuid4())),  # an entry id of no entry
        token(["2026-01-01T00:00:00+00:00", 2**64, 1]),  # past a bigint
        token(["2026-01-01T00:00:00+00:00", 1, -(2**63) - 1]),
        token(["2026-01-01T00:00:00+00:00", 1e400, 1]),
        token(["0001-01-01T00:00:00+14:00", 1, 1]),  # before year 1 in UTC
        token(["2026-01-01T00:00:00", 1, 1]),  # no time zone
        token([1, 2, 3, 4]),
        token({"a": 1}),
        token("x\u0000"),
    ]
    for bad in forged:
        for fmt in ("csv", "jsonl"):
            r = await client.get(f"/audit/v1/export?format={fmt}&next={bad}", headers=reader)
            assert r.status == 400, (bad, await r.text())
            body = await r.json(content_type=None)
            assert body["status"] == "400" and body["scimType"] == "invalidValue", body
            assert "next" in body["detail"]


def test_csv_records_are_what_the_csv_module_writes() -> None:
    """The export's own CSV records (str methods, for speed) read back, and are byte for byte
    the csv module's default dialect, for every kind of cell."""
    nasty = ['a"b', "a,b", "a\nb", "a\rb", '"', "", " lead", "=1+2", "-x", "@", "\tt", "é ✓"]
    entry: dict[str, Any] = {
        "id": "e1",
        "activityDateTime": "2026-01-01T00:00:00Z",
        "changeId": None,
        "clientRequestId": "-dash",
        "provisioningAction": "update",
        "provisioningStatusInfo": {
            "status": "failure",
            "errorInformation": {"errorCode": "X", "reason": 'bad "value", here\r\n'},
        },
        "targetIdentity": {"identityType": "User", "id": None, "displayName": "=HYPERLINK(1)"},
        "sourceIdentity": {"id": "+1"},
        "initiatedBy": {"displayName": "@evil"},
        "request": {"method": "PATCH", "path": "/scim/v2/Users/a,b", "status": 400},
        "durationInMilliseconds": 1.25,
        "modifiedProperties": [{"displayName": n, "oldValue": n, "newValue": None} for n in nasty],
    }
    text = io.StringIO()
    csv.writer(text).writerow(csv_row(entry))
    assert csv_line(entry) == text.getvalue()
    for value in nasty:
        entry["targetIdentity"]["displayName"] = value
        text = io.StringIO()
        csv.writer(text).writerow(csv_row(entry))
        assert csv_line(entry) == text.getvalue(), value
        [row] = csv.reader(io.StringIO(csv_line(entry), newline=""))
        assert row[10] == neutralise(value)
