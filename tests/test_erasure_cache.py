"""The key ring's cache is bounded (issue 17): an LRU of `SCIMLEDGER_KEY_CACHE` subjects. An
evicted subject's key is read again from `subject_keys` when needed; an erased one stays erased.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest
from aiohttp.test_utils import TestClient

from infra.database import Database
from infra.eventstore import START
from infra.keys import KEY_CACHE_ENV, _cache_size, latest_ring
from infra.tenants import IssuedToken
from tests.test_audit import audit_auth, settled
from tests.test_entra_users import create as create_user
from tests.test_entra_users import patch

Client = TestClient[Any, Any]
CAP = 10


async def test_a_capped_key_cache_reads_and_erases_right(
    client: Client, auth: dict[str, str], database: Database, tenant: IssuedToken
) -> None:
    rings = {id(database.store.keys): database.store.keys, id(latest_ring()): latest_ring()}
    for ring in rings.values():
        ring.forget(list(ring._subjects) + list(ring._absent))
        ring.cache_size = CAP

    def cached() -> int:
        return max(ring.cached() for ring in rings.values())

    reader = await audit_auth(database)
    users: list[dict[str, Any]] = []
    for i in range(50):
        user = await create_user(client, auth, user_name=f"person{i:02d}@contoso.com")
        assert cached() <= CAP
        await patch(client, auth, user["id"], {"op": "Replace", "path": "title", "value": f"T{i}"})
        assert cached() <= CAP
        users.append(user)
        # A reader's page (here the audit log's 500 entries) may overshoot the cap while it
        # is used; the next load (each write) trims the cache back under it.
        await settled(client, reader)
    # The first users' keys were evicted long ago: changing them reloads them.
    for user in users[:5]:
        await patch(client, auth, user["id"], {"op": "Replace", "path": "title", "value": "again"})
        assert cached() <= CAP
        await settled(client, reader)
    gone = users[0]
    r = await client.delete(f"/scim/v2/Users/{gone['id']}", headers=auth)
    assert r.status == 204
    await settled(client, reader)
    r = await client.post("/audit/v1/erasures", json={"userId": gone["id"]}, headers=reader)
    assert r.status == 201, await r.text()
    await settled(client, reader)
    await patch(client, auth, users[9]["id"], {"op": "Replace", "path": "title", "value": "T9"})
    assert cached() <= CAP

    # Every event decodes right, page by page, through the capped ring.
    store = database.store
    decoded: dict[UUID, list[str]] = {}
    after = START
    while True:
        page = await store.read_all(after, 3)
        if not page:
            break
        for r in page:
            decoded.setdefault(r.originator_id, []).append(repr(vars(store.to_domain(r))))
        after = page[-1].position
        assert cached() <= CAP
    for i, user in enumerate(users):
        text = "\n".join(decoded[UUID(user["id"])])
        if user is gone:
            assert "person00" not in text and "[erased" in text, text
        else:
            assert f"person{i:02d}@contoso.com" in text and f"T{i}" in text, text
    # The audit history of an evicted subject reads right; the erased one's reads erased.
    r = await client.get(f"/audit/v1/resources/{users[1]['id']}/history", headers=reader)
    assert r.status == 200 and b"person01@contoso.com" in await r.read()
    r = await client.get("/audit/v1/export?format=jsonl", headers=reader)
    export = await r.read()
    assert b"person00" not in export and b"person49@contoso.com" in export
    # The erased subject stays erased once its key is evicted: a write for it is refused.
    for user in users[1:12]:  # evicts the erased one's cached None
        await patch(client, auth, user["id"], {"op": "Replace", "path": "title", "value": "3"})
    r = await client.get(f"/scim/v2/Users/{users[30]['id']}", headers=auth)
    assert (await r.json())["title"] == "T30"
    assert not database.store.keys.known(UUID(gone["id"]))
    async with database.pool.acquire() as conn:
        await database.store.keys.load(conn, [UUID(gone["id"])])
    assert database.store.keys.known(UUID(gone["id"]))
    assert database.store.keys.cipher(UUID(gone["id"])) is None
    assert cached() <= CAP


def test_the_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_CACHE_ENV, "7")
    assert _cache_size() == 7
    monkeypatch.setenv(KEY_CACHE_ENV, "0")
    with pytest.raises(ValueError, match=KEY_CACHE_ENV):
        _cache_size()
    monkeypatch.delenv(KEY_CACHE_ENV)
    assert _cache_size() == 100_000
