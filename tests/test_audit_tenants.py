"""Issue 14: a tenant's provisioning log tells nothing about other tenants' volume.

Entries used to carry `eventPositions`, the global positions of the events a request stored:
the gap between two of tenant A's entries counted tenant B's events meanwhile. Here A does
the same two rounds of requests, once with B idle between them and once with B busy; every
surface of A's log (API list, one entry, JSONL export, web page, CLI) must read the same for
both rounds once A's own ids, names and times are set aside.
"""

from __future__ import annotations

import base64
import difflib
import re
import uuid
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from infra.database import Database
from infra.tenants import IssuedToken, create_tenant
from tests.test_audit import audit_auth, settled
from tests.test_audit_cli import audit
from tests.test_audit_web import audit_token, sign_in
from tests.test_entra_users import create as create_user
from tests.test_entra_users import patch

Client = TestClient[Any, Any]

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\b[0-9a-f]{32}\b")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT[0-9:.]+(Z|[+-]\d\d:\d\d)?|\d{4}-\d\d-\d\d [0-9:.]+( UTC)?")
_VARYING = ("activityDateTime", "durationInMilliseconds", "changeId")


def _same_shape(text: str, *names: str) -> str:
    """`text` with what differs between two rounds of the same requests put aside: ids,
    times, durations (of the web page's and CLI's rendering) and the user names given."""
    for name in names:
        text = text.replace(name, "<name>")
    text = _UUID.sub("<id>", text)
    text = _TIME.sub("<time>", text)
    durations = r"\b\d+(\.\d+)? ?ms\b|in [0-9.]+ ?m?s\b|duration ms +[0-9.]+"
    text = re.sub(durations, "<duration>", text)
    return "\n".join(line.rstrip() for line in text.splitlines())


def _assert_same(first: str, second: str) -> None:
    diff = "\n".join(difflib.unified_diff(first.splitlines(), second.splitlines(), lineterm=""))
    assert first == second, diff


def _entry_shape(entry: dict[str, Any], *names: str) -> str:
    kept = {k: v for k, v in entry.items() if k not in _VARYING}
    return _same_shape(orjson.dumps(kept, option=orjson.OPT_SORT_KEYS).decode(), *names)


async def test_entries_do_not_reveal_other_tenants_volume(
    client: Client,
    auth: dict[str, str],
    database: Database,
    tenant: IssuedToken,
    fresh_dsn: str,
) -> None:
    async with database.pool.acquire() as conn:
        other = await create_tenant(conn, "fabrikam")
    b_auth = {"Authorization": f"Bearer {other.token}"}
    reader = await audit_auth(database)
    names = ("first@contoso.com", "second@contoso.com")
    users = []
    for busy, name in zip((0, 6), names, strict=True):
        # A creates a user, B writes `busy` users meanwhile, A changes A's user.
        user = await create_user(client, auth, user_name=name)
        for i in range(busy):
            await create_user(client, b_auth, user_name=f"b{i}-{name}")
        await patch(client, auth, user["id"], {"op": "Replace", "path": "title", "value": "T"})
        users.append(user)

    body = await settled(client, reader)
    entries = list(reversed(body["entries"]))  # oldest first: round 1 create, patch, round 2 …
    assert len(entries) == 4
    rounds = [entries[:2], entries[2:]]
    # The two rounds read the same: nothing in them counts B's six users.
    shapes = [[_entry_shape(e, *names) for e in r] for r in rounds]
    assert shapes[0] == shapes[1]
    for created, changed in rounds:
        assert "eventPositions" not in created and "eventPositions" not in changed
        user_id = created["targetIdentity"]["id"]
        # The events are named by what is A's own: resource, version in its stream, type.
        assert [e for e in created["events"] if e["resource"]] == [
            {
                "resource": f"/Users/{user_id}",
                "stream": user_id,
                "version": 1,
                "type": "UserProvisioned",
            }
        ]
        assert {e["type"] for e in created["events"] if not e["resource"]} == {"RequestRecorded"}
        assert [(e["resource"], e["version"]) for e in changed["events"] if e["resource"]] == [
            (f"/Users/{user_id}", 2)
        ]

    # One entry by id, the JSONL export, the web page and the CLI: the same.
    ones = []
    for _, changed in rounds:
        r = await client.get(f"/audit/v1/entries/{changed['id']}", headers=reader)
        assert r.status == 200
        one = await r.json()
        assert one["events"] == changed["events"]
        ones.append(_entry_shape(one, *names))
    assert ones[0] == ones[1]

    r = await client.get("/audit/v1/export?format=jsonl", headers=reader)
    exported = [orjson.loads(line) for line in (await r.text()).splitlines()]
    assert [e["events"] for e in exported] == [e["events"] for e in body["entries"]]
    assert all("eventPositions" not in e for e in exported)

    session = await sign_in(client, (await audit_token(database)).token)
    pages = []
    for created, changed in rounds:
        r = await client.get(
            f"/audit/entries/{changed['id']}", headers={"Cookie": f"scimledger_audit={session}"}
        )
        assert r.status == 200
        html = await r.text()
        assert f"/Users/{created['targetIdentity']['id']}" in html
        pages.append(_same_shape(html, *names))
    _assert_same(*pages)

    shown = []
    for created, changed in rounds:
        code, out, err = await audit(fresh_dsn, "show", "--tenant", "acme", changed["id"])
        assert code == 0, err
        assert f"/Users/{created['targetIdentity']['id']} v2" in out
        shown.append(_same_shape(out, *names))
    _assert_same(*shown)


async def test_page_tokens_hold_the_entry_id_only(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    """A page token used to hold the last entry's transaction id, a global counter: now it
    holds the entry's id, and the service looks the position up in the tenant's own log."""
    reader = await audit_auth(database)
    user = await create_user(client, auth)
    for title in ("a", "b"):
        await patch(client, auth, user["id"], {"op": "Replace", "path": "title", "value": title})
    entries = (await settled(client, reader))["entries"]
    seen, token = [], None
    while True:
        query = "limit=1" + (f"&next={token}" if token else "")
        body = await (await client.get(f"/audit/v1/entries?{query}", headers=reader)).json()
        seen += body["entries"]
        token = body["next"]
        if token is None:
            break
        held = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        assert held == seen[-1]["id"]
    assert [e["id"] for e in seen] == [e["id"] for e in entries]
    r = await client.get(f"/audit/v1/resources/{user['id']}/history?limit=1", headers=reader)
    token = (await r.json())["next"]
    held = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    assert held == entries[-1]["id"]
    # A token naming no entry of this tenant is refused, not read as "from the start".
    async with database.pool.acquire() as conn:
        other = await create_tenant(conn, "fabrikam")
    await create_user(client, {"Authorization": f"Bearer {other.token}"})
    [theirs] = (await settled(client, await audit_auth(database, "fabrikam")))["entries"]
    for named in (theirs["id"], str(uuid.uuid4())):
        foreign = base64.urlsafe_b64encode(orjson.dumps(named)).decode().rstrip("=")
        r = await client.get(f"/audit/v1/entries?next={foreign}", headers=reader)
        assert r.status == 400, named
