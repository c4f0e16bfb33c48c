"""Erasure by crypto-shredding (issue 17): the person is gone from every byte, nobody else is.

The users and groups are made the real way (SCIM requests to the app), the erasure through the
audit API, the checks on the raw tables, a fresh key ring, the exports and the CLI.
"""

from __future__ import annotations

import asyncio
import base64
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from domain.user import User
from infra.database import Database
from infra.eventstore import START, ConcurrencyError, EventStore
from infra.keys import MASTER_ENV, MASTER_FILE_ENV, KeyRing, SubjectErased, load_master_key
from infra.tenants import IssuedToken, create_tenant
from tests.test_audit import audit_auth, settled
from tests.test_audit_web import sign_in
from tests.test_cli import run
from tests.test_entra_groups import create_group, patch_group
from tests.test_entra_users import create as create_user
from tests.test_entra_users import patch

Client = TestClient[Any, Any]

ADA = "Ada.Lovelace@contoso.com"
BOB = "Bob.Babbage@contoso.com"


async def _everything(database: Database) -> bytes:
    """Every byte of every table the service writes, as PostgreSQL prints it."""
    out = []
    async with database.pool.acquire() as conn:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        for t in tables:
            rows = await conn.fetch(f'SELECT t::text FROM "{t["tablename"]}" t')
            out += [r[0].encode() for r in rows]
        # bytea columns print as hex: the raw events too, as the bytes they are.
        out += [r[0] for r in await conn.fetch("SELECT state FROM stored_events")]
    return b"\n".join(out)


async def _decoded(dsn: str, database: Database) -> str:
    """Every event of the store as a fresh process (new key ring, same master key) reads it."""
    store = EventStore(database.pool, keys=KeyRing(load_master_key(Path("unused"))))
    text = []
    for r in await store.read_all(START, 100_000):
        text.append(repr(vars(store.to_domain(r))))
    return "\n".join(text)


async def _cli(dsn: str, *args: str) -> tuple[int, str, str]:
    return await run(*args, "--database-url", dsn)


async def test_erasure_forgets_the_person_and_nobody_else(
    client: Client,
    auth: dict[str, str],
    database: Database,
    tenant: IssuedToken,
    fresh_dsn: str,
) -> None:
    reader = await audit_auth(database)
    ada = await create_user(client, auth, user_name=ADA, external_id="ada-ext-77")
    bob = await create_user(client, auth, user_name=BOB, external_id="bob-ext-88")
    await patch(client, auth, ada["id"], {"op": "Replace", "path": "title", "value": "Countess"})
    await patch(
        client, auth, ada["id"], {"op": "Replace", "path": "name.givenName", "value": "Augusta"}
    )
    group = await create_group(client, auth, "Analytical Engines")
    await patch_group(
        client,
        auth,
        group["id"],
        {"op": "Add", "path": "members", "value": [{"value": ada["id"]}, {"value": bob["id"]}]},
    )
    # Encrypted from the start: not one event holds a personal value in clear.
    raw = b"".join(r[0] for r in await database.pool.fetch("SELECT state FROM stored_events"))
    for clear in (ADA.encode(), b"Augusta", b"Countess", b"ada-ext-77", BOB.encode()):
        assert clear not in raw
    assert b'"active":true' in raw  # what is not personal stays readable

    before_deletion = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    await asyncio.sleep(0.01)
    r = await client.delete(f"/scim/v2/Users/{ada['id']}", headers=auth)
    assert r.status == 204
    await settled(client, reader)

    # Another tenant's audit token can neither perform nor see it.
    async with database.pool.acquire() as conn:
        await create_tenant(conn, "fabrikam")
    stranger = await audit_auth(database, "fabrikam")
    r = await client.post("/audit/v1/erasures", json={"userId": ada["id"]}, headers=stranger)
    assert r.status == 404, await r.text()
    # A provisioning token may not either.
    r = await client.post("/audit/v1/erasures", json={"userId": ada["id"]}, headers=auth)
    assert r.status == 403
    # Bob still exists: refused, nothing done.
    r = await client.post("/audit/v1/erasures", json={"userId": bob["id"]}, headers=reader)
    assert r.status == 409, await r.text()
    assert "--force" in (await r.json())["detail"]

    r = await client.post(
        "/audit/v1/erasures",
        json={"userId": ada["id"], "reason": "GDPR Art. 17 request #4711"},
        headers=reader,
    )
    assert r.status == 201, await r.text()
    receipt = await r.json()
    assert receipt["subjectId"] == ada["id"] and receipt["events"] >= 4
    r = await client.post("/audit/v1/erasures", json={"userId": ada["id"]}, headers=reader)
    assert r.status == 409  # already erased

    body = await settled(client, reader)
    erase_entry = next(e for e in body["entries"] if e["provisioningAction"] == "erase")
    assert ada["id"] in str(erase_entry) and "GDPR" in str(erase_entry)
    r = await client.get("/audit/v1/erasures", headers=stranger)
    assert (await r.json())["erasures"] == []
    r = await client.get(f"/audit/v1/erasures/{receipt['id']}", headers=stranger)
    assert r.status == 404
    r = await client.get(f"/audit/v1/erasures/{receipt['id']}", headers=reader)
    assert (await r.json())["verified"] is True, await r.text()

    # Raw bytes of every table, events decoded by a fresh process, the exports, history.
    everything = await _everything(database)
    decoded = await _decoded(fresh_dsn, database)
    exports = b""
    for fmt in ("csv", "jsonl"):
        r = await client.get(f"/audit/v1/export?format={fmt}", headers=reader)
        assert r.status == 200
        exports += await r.read()
    r = await client.get(f"/audit/v1/resources/{ada['id']}/history", headers=reader)
    history = await r.read()
    assert r.status in (200, 404), history
    r = await client.get(f"/audit/v1/resources/{ada['id']}?at={before_deletion}", headers=reader)
    at = await r.read()  # time travel to before the deletion: the user, values erased
    assert r.status == 200 and b"[erased" in at, at
    history += at
    for clear in (ADA, "Ada", "Lovelace", "Augusta", "Countess", "ada-ext-77"):
        assert clear.encode() not in everything, clear
        assert clear not in decoded, clear
        assert clear.encode() not in exports, clear
        assert clear.encode() not in history, clear
    assert "[erased]" in decoded
    # Bob is intact.
    assert BOB in decoded and "bob-ext-88" in decoded and BOB.encode() in exports
    r = await client.get(f"/scim/v2/Users/{bob['id']}", headers=auth)
    assert (await r.json())["userName"] == BOB

    # The views rebuild the same, the receipt verifies from the command line.
    code, out, err = await _cli(fresh_dsn, "projections", "verify", "--all", "--quiet")
    assert code == 0, out + err
    code, out, err = await _cli(fresh_dsn, "erase", "verify", receipt["id"])
    assert code == 0, out + err
    code, out, err = await _cli(fresh_dsn, "audit", "erasures", "--tenant", "acme", "--json")
    assert code == 0 and receipt["id"] in out and "GDPR" in out, out + err

    # The provisioning-log page: erasures, the receipt with its check, entries read erased.
    await sign_in(client, reader["Authorization"].split()[1])
    r = await client.get("/audit/erasures")
    page = await r.text()
    assert r.status == 200 and receipt["id"] in page and "GDPR Art. 17" in page
    r = await client.get(f"/audit/erasures/{receipt['id']}")
    assert r.status == 200 and 'id="verified"' in await r.text()
    r = await client.get("/audit/")
    page = await r.text()
    assert r.status == 200 and "[erased]" in page and "Lovelace" not in page and BOB in page
    await sign_in(client, stranger["Authorization"].split()[1])
    r = await client.get(f"/audit/erasures/{receipt['id']}")
    assert r.status == 404

    # The userName is free again; the new Ada is a new subject with a new key.
    again = await create_user(client, auth, user_name=ADA)
    assert again["id"] != ada["id"]
    keys = await database.pool.fetch(
        "SELECT subject_id, wrapped FROM subject_keys WHERE subject_id = ANY($1::uuid[])",
        [UUID(ada["id"]), UUID(again["id"])],
    )
    by_id = {str(k["subject_id"]): k["wrapped"] for k in keys}
    assert by_id[ada["id"]] is None and by_id[again["id"]] is not None


async def test_force_deprovisions_first_and_writes_for_an_erased_subject_are_refused(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken, fresh_dsn: str
) -> None:
    ada = await create_user(client, auth, user_name=ADA)
    code, out, err = await _cli(
        fresh_dsn, "erase", "--tenant", "acme", "--user", ada["id"], "--reason", "test"
    )
    assert code == 1 and "--force" in err, out + err
    code, out, err = await _cli(
        fresh_dsn, "erase", "--tenant", "acme", "--user", ada["id"], "--force", "--json"
    )
    assert code == 0, out + err
    r = await client.get(f"/scim/v2/Users/{ada['id']}", headers=auth)
    assert r.status == 404
    # This instance's key ring still holds the key: the append itself refuses.
    # Erased by another process: a reader of the stream re-reads its key row and sees it.
    user: Any = None
    for record in await database.store.read_stream(database.pool, UUID(ada["id"])):
        user = database.store.to_domain(record).mutate(user)  # type: ignore[attr-defined]
    assert user is not None and user.deprovisioned
    assert "[erased" in user.state["userName"]
    # Another instance still caching the key (it never saw the erasure): the appending
    # statement itself refuses, and nothing is written.
    sid = UUID(ada["id"])
    database.store.keys._subjects[sid] = AESGCM(os.urandom(32))
    stale = User.from_state(
        sid, user.version, tenant.tenant_id, {"userName": "x"}, user.created_on, user.modified_on
    )
    stale._change_user_name("someone@else")
    before = await database.pool.fetchval("SELECT count(*) FROM stored_events")
    async with database.pool.acquire() as conn:
        with pytest.raises(SubjectErased):
            await database.store.append(conn, tenant.tenant_id, stale.collect_events())
    assert await database.pool.fetchval("SELECT count(*) FROM stored_events") == before
    # ... and that instance has learnt it: its cached key is gone.
    assert database.store.keys.known(sid) and database.store.keys.cipher(sid) is None
    # A first event for the erased subject (a stream started again under its id, from a stale
    # instance): the appending statement reads no key row for a first event, the stream's
    # existing first event refuses it; nothing is written and the key stays destroyed.
    for stale_key in (AESGCM(os.urandom(32)), None):  # a stale key; none (a new key is made)
        if stale_key is None:
            database.store.keys.forget([sid])
        else:
            database.store.keys._subjects[sid] = stale_key
        again = User.provision(sid, tenant.tenant_id, {"userName": "someone@else"})
        async with database.pool.acquire() as conn:
            with pytest.raises(ConcurrencyError):
                await database.store.append(conn, tenant.tenant_id, again.collect_events())
        assert await database.pool.fetchval("SELECT count(*) FROM stored_events") == before
    wrapped = await database.pool.fetchval(
        "SELECT wrapped FROM subject_keys WHERE subject_id = $1", sid
    )
    assert wrapped is None


def test_the_embedded_default_makes_a_master_key_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MASTER_ENV, raising=False)
    monkeypatch.delenv(MASTER_FILE_ENV, raising=False)
    first = load_master_key(tmp_path)
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600
    assert load_master_key(tmp_path) == first and len(first) == 32
    monkeypatch.setenv(MASTER_ENV, base64.b64encode(b"x" * 31).decode())
    with pytest.raises(ValueError, match="32 bytes"):
        load_master_key(tmp_path)


async def test_migrate_seals_old_events_in_place_and_a_restored_backup_stays_unreadable(
    database: Database, tenant: IssuedToken, fresh_dsn: str
) -> None:
    from infra.transcoder import make_mapper
    from service import erasure

    # A store from before encryption: events appended in clear, with no key rows.
    plain = make_mapper()
    people = [
        User.provision(uuid4(), tenant.tenant_id, {"userName": f"old{i}@contoso.com"})
        for i in range(3)
    ]
    for person in people:
        person.update({"userName": person.user_name, "title": "Engineer"})  # a second event
        async with database.pool.acquire() as conn:
            stored = [plain.to_stored_event(e) for e in person.collect_events()]
            await database.store.append_stored(conn, tenant.tenant_id, stored)
    positions = await database.pool.fetch(
        "SELECT originator_id, originator_version, notification_id, transaction_id"
        " FROM stored_events ORDER BY notification_id"
    )
    raw = b"".join(r[0] for r in await database.pool.fetch("SELECT state FROM stored_events"))
    assert b"old0@contoso.com" in raw and b"Engineer" in raw
    # Readable as they are (no key row is not an erasure), the log shows them in full.
    assert "old0@contoso.com" in await _decoded(fresh_dsn, database)
    from infra.keys import is_erased

    assert not is_erased(people[0].id)

    code, out, err = await _cli(fresh_dsn, "erase", "migrate", "--quiet")
    assert code == 0 and "6 event(s) encrypted" in out, out + err
    code, out, err = await _cli(fresh_dsn, "erase", "migrate", "--quiet")
    assert code == 0 and "0 event(s) encrypted" in out, out + err  # resumable: nothing left
    raw = b"".join(r[0] for r in await database.pool.fetch("SELECT state FROM stored_events"))
    assert b"@contoso.com" not in raw and b"Engineer" not in raw
    assert positions == await database.pool.fetch(
        "SELECT originator_id, originator_version, notification_id, transaction_id"
        " FROM stored_events ORDER BY notification_id"
    )
    assert "old1@contoso.com" in await _decoded(fresh_dsn, database)

    # A backup of the event tables taken before the erasure...
    backup = await database.pool.fetch("SELECT * FROM stored_events ORDER BY notification_id")
    receipt = await erasure.erase(
        database, tenant.tenant_id, people[0].id, "User", "dpo", "request 1"
    )
    assert receipt.events == sum(1 for p in positions if p["originator_id"] == people[0].id)
    # ... restored over the live tables, read with the current keys table: still unreadable.
    async with database.pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM stored_events")
        columns = list(backup[0].keys())
        await conn.copy_records_to_table("stored_events", records=backup, columns=columns)
    decoded = await _decoded(fresh_dsn, database)
    assert "old0@contoso.com" not in decoded and "old1@contoso.com" in decoded
    assert "[erased" in decoded
    _, problems = await erasure.verify(database, receipt.id)
    assert problems == []


async def test_keys_rotate_rewraps_data_keys_and_events_still_read(
    database: Database, tenant: IssuedToken, fresh_dsn: str, tmp_path: Path
) -> None:
    person = User.provision(uuid4(), tenant.tenant_id, {"userName": "rot@contoso.com"})
    await database.store.append_now(tenant.tenant_id, person.collect_events())
    raw_before = await database.pool.fetch("SELECT state FROM stored_events")
    wrapped_before = await database.pool.fetchval(
        "SELECT wrapped FROM subject_keys WHERE subject_id = $1", person.id
    )
    new_master = tmp_path / "new.key"
    code, out, err = await run("keys", "new-master", str(new_master))
    assert code == 0, err
    code, out, err = await _cli(
        fresh_dsn, "keys", "rotate", "--new-master-key-file", str(new_master)
    )
    assert code == 0 and "acme: 1 data key(s) rewrapped" in out, out + err
    assert raw_before == await database.pool.fetch("SELECT state FROM stored_events")
    row = await database.pool.fetchrow(
        "SELECT wrapped, kek_version FROM subject_keys WHERE subject_id = $1", person.id
    )
    assert row["wrapped"] != wrapped_before and row["kek_version"] == 2
    # The old master no longer opens anything; the new one reads every event.
    with pytest.raises(LookupError, match="master key"):
        await _decoded(fresh_dsn, database)
    new = base64.b64decode(new_master.read_text())
    store = EventStore(database.pool, keys=KeyRing(new))
    events = [store.to_domain(r) for r in await store.read_all(START, 100)]
    assert any(getattr(e, "user_name", None) == "rot@contoso.com" for e in events)


async def test_a_feed_gives_no_full_set_of_an_erased_subject(
    client: Client, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    import jwt

    from service import erasure
    from service.feeds import streams
    from tests.test_feeds import _collect

    ada = await create_user(client, auth, user_name=ADA, external_id="ada-ext-77")
    bob = await create_user(client, auth, user_name=BOB)
    await erasure.erase(database, tenant.tenant_id, UUID(ada["id"]), "User", "dpo", force=True)
    async with database.pool.acquire() as conn:
        stream = await streams.create(
            conn, tenant="acme", name="late", endpoint=None,
            events=["prov:create"], full=True, scope_group=None, from_start=True,
        )  # fmt: skip
    got: list[str] = []
    await _collect(client, stream["id"], stream["token"], got, 2, [])
    claims = {
        c["sub_id"]["uri"]: c
        for c in (jwt.decode(t, options={"verify_signature": False}) for t in got)
    }
    erased = claims[f"/Users/{ada['id']}"]
    assert list(erased["events"]) == ["urn:ietf:params:scim:event:prov:create:notice"], erased
    assert (
        "userName"
        in erased["events"]["urn:ietf:params:scim:event:prov:create:notice"]["attributes"]
    )
    assert "externalId" not in erased["sub_id"]
    assert ADA not in str(erased) and "ada-ext-77" not in str(erased)
    full = claims[f"/Users/{bob['id']}"]["events"]
    assert full["urn:ietf:params:scim:event:prov:create:full"]["data"]["userName"] == BOB
