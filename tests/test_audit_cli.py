"""`scimledger audit …`: the provisioning log from the command line, run as a separate process.

The entries are made the real way: SCIM requests to the app, whose audit projection (the
asynchronous runner) writes them; the CLI then reads the same database.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from infra.database import Database
from infra.tenants import IssuedToken
from service.audit_export import CSV_COLUMNS
from tests.test_audit import audit_auth, settled
from tests.test_cli import run
from tests.test_entra_users import create as create_user
from tests.test_entra_users import entra_user, headers, patch

Client = TestClient[Any, Any]


@pytest.fixture
async def history(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> dict[str, Any]:
    """A create, an update, and a duplicate create that fails; settled in the audit log."""
    reader = await audit_auth(database)
    user = await create_user(client, auth, user_name="Ada.Lovelace@contoso.com")
    await patch(client, auth, user["id"], {"op": "Replace", "path": "title", "value": "Countess"})
    r = await client.post(
        "/scim/v2/Users",
        json=entra_user("Ada.Lovelace@contoso.com"),
        headers={**headers(auth), "X-Request-Id": "dup-cli-1"},
    )
    assert r.status == 409
    body = await settled(client, reader)
    assert len(body["entries"]) == 3
    return {"user": user, "entries": body["entries"]}


async def audit(dsn: str, *args: str) -> tuple[int, str, str]:
    return await run("audit", *args, "--database-url", dsn)


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


async def test_list_filters_and_pages_as_json_lines(
    fresh_dsn: str, history: dict[str, Any]
) -> None:
    api = history["entries"]  # newest first, as the HTTP API returned them
    user_id = history["user"]["id"]
    code, out, err = await audit(fresh_dsn, "list", "--tenant", "acme", "--json")
    assert code == 0, err
    assert json_lines(out) == api  # no {"next": …} line: there is no further page

    # Pages of two: two entries then the token; the token gives the last entry and no token.
    code, out, err = await audit(fresh_dsn, "list", "--tenant", "acme", "--json", "--limit", "2")
    assert code == 0, err
    first = json_lines(out)
    assert first[:2] == api[:2] and set(first[2]) == {"next"} and len(first) == 3
    code, out, err = await audit(
        fresh_dsn, "list", "--tenant", "acme", "--json", "--limit", "2", "--next", first[2]["next"]
    )
    assert code == 0, err
    assert json_lines(out) == api[2:]

    async def ids(*filters: str) -> list[str]:
        code, out, err = await audit(fresh_dsn, "list", "--tenant", "acme", "--json", *filters)
        assert code == 0, (filters, err)
        lines = json_lines(out)
        assert all("next" not in line for line in lines)
        return [e["id"] for e in lines]

    failed = next(e for e in api if e["provisioningStatusInfo"]["status"] == "failure")
    created = next(e for e in api if e["provisioningAction"] == "create" and e is not failed)
    updated = next(e for e in api if e["provisioningAction"] == "update")
    assert failed["clientRequestId"] == "dup-cli-1"
    checks = {
        ("--status", "failure"): [failed["id"]],
        ("--error-code", "EntryConflict"): [failed["id"]],
        ("--change-id", failed["changeId"]): [failed["id"]],
        ("--change-id", "dup-cli-1"): [],
        ("--client-request-id", "dup-cli-1"): [failed["id"]],
        ("--action", "update"): [updated["id"]],
        ("--action", "create", "--status", "success"): [created["id"]],
        ("--target", user_id): [updated["id"], created["id"]],
        ("--identity", "ada.LOVELACE"): [updated["id"], created["id"]],
        ("--identity", "nobody"): [],
        ("--from", "2000-01-01T00:00:00Z", "--to", "2999-01-01T00:00:00Z"): [e["id"] for e in api],
        ("--to", "2000-01-01T00:00:00Z"): [],
    }
    results = await asyncio.gather(*(ids(*f) for f in checks))
    for (filters, expected), got in zip(checks.items(), results, strict=True):
        assert got == expected, filters


async def test_list_table_show_and_history(fresh_dsn: str, history: dict[str, Any]) -> None:
    api = history["entries"]
    user_id = history["user"]["id"]
    failed = next(e for e in api if e["provisioningStatusInfo"]["status"] == "failure")
    updated = next(e for e in api if e["provisioningAction"] == "update")
    (
        (code, table, err),
        (show_code, shown, show_err),
        (text_code, text, text_err),
        (hist_code, hist, hist_err),
        (hist_table_code, hist_table, _),
    ) = await asyncio.gather(
        audit(fresh_dsn, "list", "--tenant", "acme"),
        audit(fresh_dsn, "show", "--tenant", "acme", failed["id"], "--json"),
        audit(fresh_dsn, "show", "--tenant", "acme", updated["id"]),
        audit(fresh_dsn, "history", "--tenant", "acme", user_id, "--json"),
        audit(fresh_dsn, "history", "--tenant", "acme", user_id),
    )
    assert code == 0, err
    for e in api:  # one row per entry, whole ids
        assert e["id"] in table
    assert "EntryConflict" in table and "Ada.Lovelace@contoso.com" in table
    assert "next page" not in table

    assert show_code == 0, show_err
    assert json.loads(shown) == failed

    assert text_code == 0, text_err
    assert updated["id"] in text and "PATCH" in text
    assert "title" in text and "Countess" in text  # the modified property, with its new value

    assert hist_code == 0, hist_err
    entries = json_lines(hist)
    assert [e["provisioningAction"] for e in entries] == ["create", "update"]  # oldest first
    assert all(e["targetIdentity"]["id"] == user_id for e in entries)
    assert hist_table_code == 0 and updated["id"] in hist_table


async def test_export_csv_and_jsonl(
    fresh_dsn: str, history: dict[str, Any], tmp_path: Path
) -> None:
    api = history["entries"]
    code, out, err = await audit(fresh_dsn, "export", "--tenant", "acme", "--format", "csv")
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert tuple(rows[0]) == CSV_COLUMNS
    by_column = [dict(zip(CSV_COLUMNS, row, strict=True)) for row in rows[1:]]
    assert [r["id"] for r in by_column] == [e["id"] for e in api]  # newest first, like list
    failed = next(r for r in by_column if r["status"] == "failure")
    assert failed["errorCode"] == "EntryConflict" and failed["httpStatus"] == "409"
    assert failed["clientRequestId"] == "dup-cli-1" and failed["method"] == "POST"
    updated = next(r for r in by_column if r["provisioningAction"] == "update")
    assert {"displayName": "title", "oldValue": None, "newValue": "Countess"} in json.loads(
        updated["modifiedProperties"]
    )

    code, out, err = await audit(
        fresh_dsn, "export", "--tenant", "acme", "--format", "csv", "--status", "success"
    )
    assert code == 0, err
    assert len(list(csv.reader(io.StringIO(out)))) == 1 + 2

    target = tmp_path / "log.jsonl"
    code, out, err = await audit(
        fresh_dsn, "export", "--tenant", "acme", "--format", "jsonl", "--output", str(target)
    )
    assert code == 0, err
    assert out == "" and "exported 3 entries" in err
    assert json_lines(target.read_text()) == api
    assert os.listdir(tmp_path) == ["log.jsonl"]  # no partial file left over


async def test_bad_filters_exit_2_and_unknown_tenants_exit_1(
    fresh_dsn: str, history: dict[str, Any], tmp_path: Path
) -> None:
    user_id = history["user"]["id"]
    bad = [
        ("list", "--tenant", "acme", "--status", "nope"),
        ("list", "--tenant", "acme", "--action", "rename"),
        ("list", "--tenant", "acme", "--from", "yesterday"),
        ("list", "--tenant", "acme", "--to", "2024-01-01T00:00:00"),  # no time zone
        ("list", "--tenant", "acme", "--target", "x"),
        ("list", "--tenant", "acme", "--next", "%%%"),
        ("list", "--tenant", "acme", "--limit", "0"),
        ("history", "--tenant", "acme", "not-an-id"),
        ("export", "--tenant", "acme", "--format", "xml"),
        ("export", "--tenant", "acme", "--format", "csv", "--status", "nope"),
    ]
    unknown = [
        ("list", "--tenant", "nope"),
        ("show", "--tenant", "nope", history["entries"][0]["id"]),
        ("history", "--tenant", "nope", user_id),
        ("export", "--tenant", "nope", "--format", "jsonl", "--output", str(tmp_path / "x")),
    ]
    results = await asyncio.gather(*(audit(fresh_dsn, *args) for args in bad + unknown))
    for args, (code, out, err) in zip(bad, results[: len(bad)], strict=True):
        assert code == 2, (args, err)
        assert out == "" and len(err.strip().splitlines()) == 1, (args, err)
        assert err.startswith("scimledger: error: ") and "Traceback" not in err
    for args, (code, out, err) in zip(unknown, results[len(bad) :], strict=True):
        assert code == 1, (args, err)
        assert out == "" and err == "scimledger: error: no tenant named 'nope'\n", args
    assert not os.listdir(tmp_path)  # the failed export left no file

    # An entry of no tenant's, or of another tenant's, is not found: one line, exit 1.
    code, out, err = await audit(fresh_dsn, "show", "--tenant", "acme", user_id)
    assert code == 1 and out == ""
    assert err == f"scimledger: error: no audit entry {user_id} in tenant 'acme'\n"
