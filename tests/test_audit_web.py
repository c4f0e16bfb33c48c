"""The compliance officers' web pages at /audit/: sessions over HTTP, and the portal in Chromium.

The browser test drives Debian's Chromium (/usr/bin/chromium, installed by `make test`) through
Playwright; it fails, never skips, when that browser is missing or cannot start.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, async_playwright, expect

from infra.config import Settings
from infra.database import Database
from infra.tenants import IssuedToken, create_tenant, issue_token, revoke_token
from service import audit_web
from tests.test_audit import settled
from tests.test_entra_users import create as create_user
from tests.test_entra_users import entra_user, headers, patch

Client = TestClient[Any, Any]
CHROMIUM = "/usr/bin/chromium"
MAX_EXPORT_ENTRIES = 2
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


async def audit_token(database: Database, tenant: str = "acme") -> IssuedToken:
    async with database.pool.acquire() as conn:
        return await issue_token(conn, tenant, "audit", "compliance")


async def sign_in(client: Client, token: str) -> str:
    """Sign in over plain HTTP; return the session cookie's value."""
    r = await client.post("/audit/sign-in", data={"token": token}, allow_redirects=False)
    assert r.status == 303, await r.text()
    assert r.headers["Location"] == "/audit/"
    return r.cookies["scimledger_audit"].value


async def activity(client: Client, auth: dict[str, str]) -> dict[str, Any]:
    """A create, an update and a 409 failure: the user."""
    user = await create_user(client, auth, external_id="ext-7")
    await patch(
        client, auth, user["id"], {"op": "Replace", "path": "name.givenName", "value": "Babs"}
    )
    r = await client.post(
        "/scim/v2/Users", json=entra_user(), headers={**headers(auth), "X-Request-Id": "dup-1"}
    )
    assert r.status == 409
    return user


async def test_sessions_keep_no_token_and_end_with_it(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    token = await audit_token(database)
    r = await client.get("/audit/")
    assert r.status == 200 and "Sign in to the provisioning log" in await r.text()
    r = await client.get("/audit/entries/00000000-0000-0000-0000-000000000000")
    assert r.status == 401 and 'name="next" value="/audit/entries/' in await r.text()

    r = await client.post("/audit/sign-in", data={"token": tenant.token}, allow_redirects=False)
    assert r.status == 403 and "provisioning token" in await r.text()
    assert "Set-Cookie" not in r.headers
    r = await client.post("/audit/sign-in", data={"token": "scimledger_nope"})
    assert r.status == 401 and "not valid" in await r.text()

    r = await client.post("/audit/sign-in", data={"token": token.token}, allow_redirects=False)
    assert r.status == 303
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/audit/" in cookie
    assert "Max-Age=28800" in cookie and token.token not in cookie
    session_id = r.cookies["scimledger_audit"].value
    rows = await database.pool.fetch(
        "SELECT id_hash, token_id, created_at, expires_at FROM audit_sessions"
    )
    assert len(rows) == 1
    assert bytes(rows[0]["id_hash"]) == hashlib.sha256(session_id.encode()).digest()
    assert rows[0]["token_id"] == token.id
    assert (rows[0]["expires_at"] - rows[0]["created_at"]).total_seconds() == 8 * 3600

    r = await client.get("/audit/")
    text = await r.text()
    assert r.status == 200 and "<h1>Provisioning log</h1>" in text and "compliance" in text
    assert r.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    # The cookie is no key to the JSON API, and a page ignores bearer tokens.
    r = await client.get("/audit/v1/entries")
    assert r.status == 401
    # A cross-site form post is refused.
    r = await client.post(
        "/audit/sign-out", headers={"Origin": "https://evil.example"}, allow_redirects=False
    )
    assert r.status == 403
    assert (await client.get("/audit/")).status == 200

    # Revoking the token ends the session at once.
    async with database.pool.acquire() as conn:
        await revoke_token(conn, token.id)
    r = await client.get("/audit/")
    assert "Sign in to the provisioning log" in await r.text()

    # So does time: a session lasts 8 hours.
    second = await audit_token(database)
    await sign_in(client, second.token)
    assert "<h1>Provisioning log</h1>" in await (await client.get("/audit/")).text()
    await database.pool.execute("UPDATE audit_sessions SET expires_at = now() - interval '1s'")
    assert "Sign in to the provisioning log" in await (await client.get("/audit/")).text()

    # Signing out deletes the session.
    await sign_in(client, second.token)
    r = await client.post("/audit/sign-out", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/audit/?signed-out=1"
    assert await database.pool.fetchval("SELECT count(*) FROM audit_sessions") == 0
    assert "You have signed out" in await (await client.get("/audit/?signed-out=1")).text()


def test_the_lag_is_shown_when_not_zero() -> None:
    assert audit_web._lag_notice({"eventsBehind": 0}) == ""
    assert "3 events behind" in audit_web._lag_notice({"eventsBehind": 3})
    assert "not started" in audit_web._lag_notice({"eventsBehind": None})


async def test_after_sign_in_only_our_own_pages(
    client: Client, database: Database, tenant: IssuedToken
) -> None:
    token = await audit_token(database)
    for target, expected in [
        ("/audit/resources/x?a=1", "/audit/resources/x?a=1"),
        ("https://evil.example/audit/", "/audit/"),
        ("//evil.example/audit/", "/audit/"),
        ("/scim/v2/Users", "/audit/"),
        ("/audit/sign-out", "/audit/"),
    ]:
        r = await client.post(
            "/audit/sign-in", data={"token": token.token, "next": target}, allow_redirects=False
        )
        assert r.headers["Location"] == expected, target


async def test_everything_from_data_is_escaped(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    evil = '<img src=x onerror="alert(1)">@contoso.com'
    user = await create_user(client, auth, user_name=evil)
    await patch(client, auth, user["id"], {"op": "Replace", "path": "displayName", "value": evil})
    token = await audit_token(database)
    await settled(client, {"Authorization": f"Bearer {token.token}"})
    await sign_in(client, token.token)
    probe = '"><script>alert(2)</script>'
    pages = [
        await (await client.get("/audit/", params={"identity": "contoso"})).text(),
        await (await client.get("/audit/", params={"changeId": probe})).text(),
        await (await client.get(f"/audit/resources/{user['id']}")).text(),
    ]
    entry_ids = re.findall(r'href="/audit/entries/([0-9a-f-]{36})', pages[0])
    assert len(set(entry_ids)) == 2
    pages += [await (await client.get(f"/audit/entries/{i}")).text() for i in set(entry_ids)]
    for html in pages:
        assert "<img" not in html and "<script>" not in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;@contoso.com" in pages[0]
    assert "&quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in pages[1]


async def test_filters_paging_export_and_tenants(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    user = await activity(client, auth)
    token = await audit_token(database)
    await settled(client, {"Authorization": f"Bearer {token.token}"})
    await sign_in(client, token.token)

    # Keyset pages of one walk the three entries, newest first.
    seen: list[str] = []
    url: str | None = "/audit/?limit=1&range=all"
    while url:
        html = await (await client.get(url)).text()
        seen += re.findall(r'<tr data-status="(\w+)"', html)
        found = re.search(r'rel="next" href="([^"]+)"', html)
        url = found.group(1).replace("&amp;", "&") if found else None
    assert seen == ["failure", "success", "success"]

    html = await (await client.get(f"/audit/?identity={user['id']}")).text()
    assert html.count("<tr data-status") == 2  # identity by id; the failure has no target
    html = await (await client.get("/audit/?errorCode=EntryConflict&range=30d")).text()
    assert html.count("<tr data-status") == 1
    r = await client.get("/audit/?range=custom&from=2000-01-01T00:00&to=2000-01-02T00:00")
    assert r.status == 200 and "No entries match" in await r.text()
    r = await client.get("/audit/?range=custom&from=yesterday")
    assert r.status == 400 and "From must be a date and time" in await r.text()
    r = await client.get("/audit/?next=%25%25%25")
    assert r.status == 400

    r = await client.get("/audit/export?format=jsonl&action=update")
    assert r.headers["Content-Disposition"].startswith('attachment; filename="provisioning-log-')
    lines = [orjson.loads(line) for line in (await r.read()).splitlines()]
    assert [e["provisioningAction"] for e in lines] == ["update"]
    r = await client.get("/audit/export?format=xml")
    assert r.status == 400
    # Exports come in pages of MAX_EXPORT_ENTRIES; "last 7 days" is pinned to the first page's.
    r = await client.get("/audit/export?format=jsonl")
    first = statuses(await r.read())
    found = re.fullmatch(r'<(/audit/export\?[^>]+)>; rel="next"', r.headers["Link"])
    assert found and "range=custom" in found.group(1) and "from=" in found.group(1)
    r = await client.get(found.group(1))
    rest = statuses(await r.read())
    assert first + rest == ["failure", "success", "success"] and "Link" not in r.headers
    r = await client.get("/audit/export?format=csv&next=%25%25%25")
    assert r.status == 400 and "next is not a page token" in await r.text()

    html = await (await client.get("/audit/?range=all")).text()
    # Without the script that follows the pages, the page says what a download holds.
    assert f"a download holds at most the newest {MAX_EXPORT_ENTRIES:,} entries" in html
    entry_ids = set(re.findall(r'href="/audit/entries/([0-9a-f-]{36})', html))
    assert len(entry_ids) == 3
    assert (await client.get(f"/audit/entries/{entry_ids.pop()}")).status == 200

    # Another tenant's officer sees none of it.
    async with database.pool.acquire() as conn:
        await create_tenant(conn, "fabrikam")
    other = await audit_token(database, "fabrikam")
    await sign_in(client, other.token)
    html = await (await client.get("/audit/?range=all")).text()
    assert "No entries match" in html
    assert (await client.get(f"/audit/resources/{user['id']}")).status == 404
    assert (await client.get(f"/audit/entries/{entry_ids.pop()}")).status == 404
    r = await client.get("/audit/export?format=csv&range=all")
    assert (await r.text()).count("\n") == 1  # the header alone


def statuses(jsonl: bytes) -> list[str]:
    return [orjson.loads(line)["provisioningStatusInfo"]["status"] for line in jsonl.splitlines()]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Exports in pages of two entries: the three of `activity` take two."""
    return replace(settings, max_export_entries=MAX_EXPORT_ENTRIES)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium, as"
            " `make test` does) to run the browser test"
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


async def test_compliance_officer_in_the_browser(
    client: Client,
    auth: dict[str, str],
    database: Database,
    tenant: IssuedToken,
    browser: Browser,
    tmp_path: Path,
) -> None:
    user = await activity(client, auth)
    token = await audit_token(database)
    await settled(client, {"Authorization": f"Bearer {token.token}"})
    base = str(client.make_url("/audit/"))
    context = await browser.new_context(
        accept_downloads=True, viewport={"width": 1360, "height": 900}
    )
    page = await context.new_page()
    page.set_default_timeout(15_000)
    rows = page.locator("table.log tbody tr")

    # A provisioning token is refused, with a reason.
    await page.goto(base)
    await expect(
        page.get_by_role("heading", name="Sign in to the provisioning log")
    ).to_be_visible()
    await page.get_by_label("Audit token").fill(tenant.token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_contain_text("This is a provisioning token")
    assert await context.cookies() == []

    # The audit token opens the log: newest first, the failure on top.
    await page.get_by_label("Audit token").fill(token.token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Provisioning log")).to_be_visible()
    await expect(rows).to_have_count(3)
    assert await rows.evaluate_all("rs => rs.map(r => r.dataset.status)") == [
        "failure",
        "success",
        "success",
    ]
    await expect(rows.nth(2)).to_contain_text("Test_User@contoso.com")
    await expect(rows.nth(2)).to_contain_text(user["id"])
    [cookie] = await context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/audit/"
    assert cookie["value"] != token.token
    await page.screenshot(path=str(tmp_path / "audit-log.png"), full_page=True)

    # Only failures: the conflict.
    await page.get_by_label("Status").select_option("failure")
    await page.get_by_role("button", name="Apply").click()
    await expect(rows).to_have_count(1)
    await expect(rows.first.locator("td.error-code")).to_have_text("EntryConflict")
    assert "status=failure" in page.url

    # The export follows the filter.
    async with page.expect_download() as info:
        await page.get_by_role("link", name="Download CSV").click()
    download = await info.value
    assert download.suggested_filename.endswith(".csv")
    text = (await download.path()).read_text(encoding="utf-8")
    exported = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [(r["status"], r["errorCode"], r["clientRequestId"]) for r in exported] == [
        ("failure", "EntryConflict", "dup-1")
    ]

    # All of it: two pages (MAX_EXPORT_ENTRIES), joined into one file by the page's script.
    await page.get_by_label("Status").select_option("")
    await page.get_by_role("button", name="Apply").click()
    await expect(rows).to_have_count(3)
    for name in ("Download CSV", "Download JSON lines"):
        async with page.expect_download() as info:
            await page.get_by_role("link", name=name).click()
        download = await info.value
        text = (await download.path()).read_text(encoding="utf-8")
        if name == "Download CSV":
            assert download.suggested_filename.endswith(".csv")
            got = [r["status"] for r in csv.DictReader(io.StringIO(text, newline=""))]
        else:
            assert download.suggested_filename.endswith(".jsonl")
            got = statuses(text.encode())
        assert got == ["failure", "success", "success"], name
    await page.get_by_label("Status").select_option("failure")
    await page.get_by_role("button", name="Apply").click()
    await expect(rows).to_have_count(1)

    # The failure's detail: steps, error code and reason, the request.
    await rows.first.get_by_role("link", name="Details").click()
    await expect(page.locator("article.entry")).to_have_attribute("data-status", "failure")
    await expect(page.locator("#troubleshooting")).to_contain_text("EntryConflict")
    await expect(page.locator("#troubleshooting")).to_contain_text("Test_User@contoso.com")
    await expect(page.locator("#steps li.failure")).to_have_count(2)
    await expect(page.locator("#request")).to_contain_text("409")
    await expect(page.locator("#request")).to_contain_text("dup-1")
    await expect(page.locator("#request")).to_contain_text("/scim/v2/Users")
    # Back to the log, the filter kept.
    await page.get_by_role("link", name="Back to the log").click()
    await expect(rows).to_have_count(1)

    # A successful update: the modified property, old → new.
    await page.get_by_label("Status").select_option("")
    await page.get_by_label("Action").select_option("update")
    await page.get_by_role("button", name="Apply").click()
    await expect(rows).to_have_count(1)
    await rows.first.get_by_role("link", name="Details").click()
    changed = page.locator("#modified tbody tr", has_text="name.givenName")
    await expect(changed.locator("td.old")).to_have_text("givenName")
    await expect(changed.locator("td.new")).to_have_text("Babs")
    await expect(page.locator("#summary")).to_contain_text("ext-7")
    await expect(page.locator("#request")).to_contain_text("PATCH")

    # Its resource's history: every change in order.
    await page.locator("#history").click()
    await expect(page.get_by_role("heading", name="History of User")).to_be_visible()
    history = page.locator("table.history tbody tr")
    await expect(history).to_have_count(2)
    await expect(history.nth(0)).to_contain_text("create")
    await expect(history.nth(1)).to_contain_text("update")
    await expect(history.nth(1)).to_contain_text("name.givenName: givenName → Babs")

    # Signing out asks for a token again, everywhere.
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("status")).to_contain_text("You have signed out")
    await expect(page.get_by_label("Audit token")).to_be_visible()
    assert await context.cookies() == []
    await page.goto(base + f"resources/{user['id']}")
    await expect(page.get_by_label("Audit token")).to_be_visible()
    await context.close()
