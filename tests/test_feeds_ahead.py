"""Feeds, issue 18: a catch-up builds the next batch's SETs while the one before is signed and
stored (service/feeds/batch.py). What it stores is what building each batch in its own step
stores, byte for byte; a subject erased between the build ahead and the step that stores it
gets notices without its values."""

from __future__ import annotations

import jwt
import orjson
import pytest

from infra.config import Settings
from infra.database import Database
from infra.tenants import IssuedToken
from service.erasure import erase
from service.feeds import batch, build, signing
from service.feeds.keys import current_key
from service.feeds.producer import Producer
from tests.test_entra_users import create as create_user
from tests.test_feeds import serving
from tests.test_feeds_catchup import BASE, _history, _produce, _stream
from tests.test_feeds_signing import _replay


@pytest.mark.parametrize("full", [False, True])
async def test_a_catch_up_built_ahead_stores_what_each_step_alone_builds(
    settings: Settings,
    database: Database,
    tenant: IssuedToken,
    auth: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    full: bool,
) -> None:
    async with serving(settings, database) as client:
        await _history(client, auth)
    stream_id = await _stream(database, "ahead", full=full)
    monkeypatch.setattr(build, "clock", lambda: 1_700_000_000.0)  # one iat for all runs
    whole = Producer(database, lambda: BASE)  # one step: nothing built ahead
    alone = await _produce(database, whole, stream_id)
    assert whole.built_ahead == 0 and len(alone) >= 10

    pool = signing.SignerPool(2)
    monkeypatch.setattr(batch, "SIGNERS", pool)
    monkeypatch.setattr(batch, "POOL_FROM", 1)  # signed by the signer processes,
    monkeypatch.setattr(batch, "CHUNK", 2)  # in chunks that split the batches
    await _replay(database, stream_id)
    try:
        ahead = Producer(database, lambda: BASE, batch_size=3)
        assert await _produce(database, ahead, stream_id) == alone
    finally:
        pool.close()
    assert ahead.built_ahead >= 3  # most steps stored a batch built ahead


async def test_a_subject_erased_after_its_sets_were_built_ahead_gets_notices(
    settings: Settings, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    async with serving(settings, database) as client:
        users = [await create_user(client, auth, user_name=f"e{i}@example.com") for i in range(8)]
    stream_id = await _stream(database, "erased", full=False)
    producer = Producer(database, lambda: BASE, batch_size=3)
    async with database.pool.acquire() as conn:
        await current_key(conn, tenant.tenant_id)  # the tenant's key, as after its first SETs
        assert await producer.step(conn, stream_id) >= 3
        ahead = await producer._built[stream_id]  # the next batch, built
        assert ahead.built is not None and ahead.built.valued
        subject = ahead.built.valued[-1].originator_id
        mine = next(u for u in users if u["id"] == str(subject))
        assert mine["externalId"]  # in the SET built ahead (sub_id, RFC 9967 §2.1)
        await erase(database, tenant.tenant_id, subject, "User", "test", "a request", force=True)
        while await producer.step(conn, stream_id):
            pass
        rows = await conn.fetch(
            "SELECT token FROM feed_sets WHERE stream_id = $1 ORDER BY seq", stream_id
        )
    claims = [jwt.decode(r["token"], options={"verify_signature": False}) for r in rows]
    theirs = [c for c in claims if c["sub_id"]["uri"] == f"/Users/{subject}"]
    assert theirs and all("externalId" not in c["sub_id"] for c in theirs)
    assert mine["externalId"].encode() not in orjson.dumps(theirs)
    others = [c for c in claims if c["sub_id"]["uri"] != f"/Users/{subject}"]
    assert all("externalId" in c["sub_id"] for c in others if "prov:create" in str(c["events"]))
