"""The provisioning log's personal values are sealed at rest under the subject's key (issue 17):
read in clear through every reader, never stored in clear, and `[erased]` once the key is gone
without a scrub having to find them."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import orjson
from aiohttp.test_utils import TestClient

from infra.database import Database
from infra.tenants import IssuedToken
from tests.test_audit import audit_auth, settled
from tests.test_audit_web import sign_in
from tests.test_entra_users import create as create_user
from tests.test_entra_users import patch
from tests.test_erasure import _cli

Client = TestClient[Any, Any]

NAME = "Grace.Hopper@contoso.com"
SECRETS = (NAME, "grace-ext-1906", "Rear Admiral", "Commodore", "cobol@contoso.com")


async def _audit_tables(database: Database) -> bytes:
    """Every byte of the provisioning log's tables, as PostgreSQL prints them."""
    rows = []
    for table in ("audit_entries", "audit_resources"):
        rows += await database.pool.fetch(f"SELECT t::text FROM {table} t")
    return b"\n".join(r[0].encode() for r in rows)


async def test_the_log_is_sealed_at_rest_and_reads_erased_without_a_scrub(
    client: Client,
    auth: dict[str, str],
    database: Database,
    tenant: IssuedToken,
    fresh_dsn: str,
) -> None:
    reader = await audit_auth(database)
    grace = await create_user(client, auth, user_name=NAME, external_id="grace-ext-1906")
    await patch(client, auth, grace["id"], {"op": "Replace", "path": "title", "value": "Commodore"})
    await patch(
        client, auth, grace["id"], {"op": "Replace", "path": "title", "value": "Rear Admiral"}
    )
    await patch(
        client,
        auth,
        grace["id"],
        {"op": "Add", "path": "emails", "value": [{"value": "cobol@contoso.com", "type": "home"}]},
    )
    body = await settled(client, reader)

    # Before any erasure: not one of her values is in the log's tables in clear.
    stored = await _audit_tables(database)
    for clear in SECRETS:
        assert clear.encode() not in stored, clear
    assert b"[encrypted]" in stored and b"title" in stored  # the shape of a change stays

    # Every reader opens them: the API's page, one entry, history, exports, the web page.
    mine = [e for e in body["entries"] if e["targetIdentity"]["id"] == grace["id"]]
    assert {e["targetIdentity"]["displayName"] for e in mine} == {NAME}
    changes = [p for e in mine for p in e["modifiedProperties"]]
    assert {"displayName": "title", "oldValue": "Commodore", "newValue": "Rear Admiral"} in changes
    r = await client.get(f"/audit/v1/entries/{mine[0]['id']}", headers=reader)
    assert (await r.json())["sourceIdentity"]["id"] == "grace-ext-1906"
    r = await client.get(f"/audit/v1/resources/{grace['id']}/history", headers=reader)
    assert b"Rear Admiral" in await r.read()
    for fmt in ("csv", "jsonl"):
        r = await client.get(f"/audit/v1/export?format={fmt}", headers=reader)
        assert NAME.encode() in await r.read()
    r = await client.get("/audit/v1/entries?identity=grace.hopper", headers=reader)
    assert {e["targetIdentity"]["id"] for e in (await r.json())["entries"]} == {grace["id"]}
    await sign_in(client, reader["Authorization"].split()[1])
    r = await client.get("/audit/")
    assert NAME in await r.text()

    # A rebuild makes the very same sealed rows (the nonce is synthetic): verify is clean.
    code, out, err = await _cli(fresh_dsn, "projections", "verify", "--all", "--quiet")
    assert code == 0, out + err

    # Her key is destroyed and nothing else: no scrub runs, the rows stay as they are. A fresh
    # process reads `[erased]` where her values were.
    await database.pool.execute(
        "UPDATE subject_keys SET wrapped = NULL WHERE subject_id = $1", UUID(grace["id"])
    )
    assert await _audit_tables(database) == stored
    code, out, err = await _cli(
        fresh_dsn, "audit", "export", "--tenant", "acme", "--format", "jsonl"
    )
    assert code == 0, out + err
    entries = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    hers = [e for e in entries if e["targetIdentity"]["id"] == grace["id"]]
    assert len(hers) == len(mine)
    for clear in SECRETS:
        assert clear not in out, clear
    assert {e["targetIdentity"]["displayName"] for e in hers} == {"[erased]"}
    values = {p["newValue"] for e in hers for p in e["modifiedProperties"]}
    assert values == {"[erased]"}
