"""SETs produced again keep their `jti` (a failover's lost commits), and an erasure turns the
subject's pending `full` SETs into notices (same jti, same order, signed again)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import jwt
import orjson
import pytest

from infra.database import Database
from infra.tenants import IssuedToken
from service.erasure import erase
from service.feeds import producer as producer_module
from service.feeds import streams
from service.feeds.erasure import claims_of, notice
from service.feeds.producer import PRODUCER
from service.feeds.sets import PREFIX
from tests.test_entra_users import create as create_user
from tests.test_entra_users import patch as patch_user
from tests.test_feeds import Client, _verify

DEADLINE = 60.0


async def _poll(client: Client, stream: dict[str, Any], acks: list[str]) -> dict[str, str]:
    r = await client.post(
        f"/events/{stream['id']}",
        json={"ack": acks, "maxEvents": 100, "returnImmediately": True},
        headers={"Authorization": f"Bearer {stream['token']}"},
    )
    assert r.status == 200, await r.text()
    return dict((await r.json())["sets"])


async def _until(client: Client, stream: dict[str, Any], want: int) -> dict[str, str]:
    """Poll (acknowledging nothing) until `want` SETs are pending; jti -> token, in order."""
    deadline = time.monotonic() + DEADLINE
    while True:
        got = await _poll(client, stream, [])
        if len(got) >= want:
            return got
        assert time.monotonic() < deadline, f"{len(got)} of {want} SETs"
        await asyncio.sleep(0.05)


async def _checkpoint(database: Database, stream_id: str) -> tuple[int, int]:
    row = await database.pool.fetchrow(
        "SELECT checkpoint_transaction, checkpoint_position FROM feed_streams WHERE id = $1",
        uuid.UUID(stream_id),
    )
    assert row is not None
    return row[0], row[1]


async def _rewind(database: Database, stream_id: str, to: tuple[int, int], drop: bool) -> None:
    """What a failover's lost asynchronous commits leave: the checkpoint back where it was
    (and, with `drop`, the SETs that step stored gone too)."""
    async with database.pool.acquire() as conn, conn.transaction():
        sid = uuid.UUID(stream_id)
        await conn.execute("SELECT 1 FROM feed_streams WHERE id = $1 FOR UPDATE", sid)
        if drop:
            await conn.execute("DELETE FROM feed_sets WHERE stream_id = $1", sid)
        await conn.execute(
            "UPDATE feed_streams SET checkpoint_transaction = $2, checkpoint_position = $3"
            " WHERE id = $1",
            sid,
            *to,
        )


async def _back_at(database: Database, stream_id: str, head: tuple[int, int]) -> None:
    deadline = time.monotonic() + DEADLINE
    while await _checkpoint(database, stream_id) < head:
        assert time.monotonic() < deadline, "the producer did not produce again"
        await asyncio.sleep(0.05)


async def test_sets_produced_again_after_lost_commits_keep_their_jti(
    client: Client, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    async with database.pool.acquire() as conn:
        stream = await streams.create(
            conn, tenant="acme", name="fo", endpoint=None, events=streams.parse_events(None),
            full=False, scope_group=None,
        )  # fmt: skip
    start = await _checkpoint(database, stream["id"])
    ada = await create_user(client, auth, user_name="ada@example.com")
    await create_user(client, auth, user_name="bob@example.com")
    await patch_user(client, auth, ada["id"], {"op": "replace", "path": "title", "value": "CTO"})
    first = await _until(client, stream, 3)
    assert len(first) == 3 and len(set(first)) == 3
    head = await _checkpoint(database, stream["id"])
    assert head > start

    # The checkpoint's commit lost, its SETs kept: produced again, no new row, no new jti.
    await _rewind(database, stream["id"], start, drop=False)
    await _back_at(database, stream["id"], head)
    assert list(await _poll(client, stream, [])) == list(first)

    # Both lost (the SETs seen by the consumer before the failover): the same jtis, in order,
    # in new tokens (signed again).
    await _rewind(database, stream["id"], start, drop=True)
    await _back_at(database, stream["id"], head)
    again = await _until(client, stream, 3)
    assert list(again) == list(first)
    assert [jwt.decode(t, options={"verify_signature": False})["jti"] for t in again.values()] == [
        *first
    ]
    # The consumer acknowledges the copies it had: nothing is left, no jti it has not seen.
    assert await _poll(client, stream, list(first)) == {}
    await create_user(client, auth, user_name="eve@example.com")
    (fresh,) = (await _until(client, stream, 1)).keys()
    assert fresh not in first
    # An operator's replay (`feeds reset`) is new SETs, not a redelivery: new jtis.
    async with database.pool.acquire() as conn:
        await streams.reset(conn, "acme", "fo", "START")
    replayed = await _until(client, stream, 4)
    assert not set(replayed) & {*first, fresh}


def _leaves(value: Any) -> set[str]:
    if isinstance(value, dict):
        return {s for v in value.values() for s in _leaves(v)}
    if isinstance(value, list):
        return {s for v in value for s in _leaves(v)}
    return {value} if isinstance(value, str) else set()


async def test_an_erasure_turns_the_subjects_pending_full_sets_into_notices(
    client: Client, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    async with database.pool.acquire() as conn:
        stream = await streams.create(
            conn, tenant="acme", name="full", endpoint=None, events=streams.parse_events(None),
            full=True, scope_group=None,
        )  # fmt: skip
    ada = await create_user(client, auth, user_name="ada.lovelace@example.com")
    await patch_user(
        client, auth, ada["id"], {"op": "replace", "path": "title", "value": "Countess of Lovelace"}
    )
    personal = {"ada.lovelace@example.com", ada["externalId"], "Countess of Lovelace"}
    personal |= _leaves(ada.get("name", {})) | {ada.get("displayName", "")}
    personal.discard("")
    before = await _until(client, stream, 2)
    seen = orjson.dumps([claims_of(t) for t in before.values()])
    assert all(value.encode() in seen for value in personal)  # the full form carries them

    r = await client.delete(f"/scim/v2/Users/{ada['id']}", headers=auth)
    assert r.status == 204
    await erase(database, tenant.tenant_id, uuid.UUID(ada["id"]), "User", "test", "a request")
    after = await _until(client, stream, 3)
    assert list(after)[:2] == list(before)  # same jtis, same order
    jwks = await (await client.get("/.well-known/jwks.json")).json(content_type=None)
    claims = _verify(list(after.values()), jwks)  # still valid signatures
    text = orjson.dumps(claims)
    assert not [value for value in personal if value.encode() in text]
    assert [sorted(c["events"]) for c in claims] == [
        [PREFIX + "prov:create:notice"],
        [PREFIX + "prov:patch:notice"],
        [PREFIX + "prov:delete"],
    ]
    assert claims[1]["events"][PREFIX + "prov:patch:notice"]["attributes"] == ["title"]
    assert "userName" in claims[0]["events"][PREFIX + "prov:create:notice"]["attributes"]
    assert all("externalId" not in c["sub_id"] for c in claims)
    stored = await database.pool.fetch("SELECT token, subject FROM feed_sets")
    assert all(r["subject"] is None for r in stored)


def test_the_notice_of_a_full_set_keeps_its_identity_and_names_the_attributes() -> None:
    claims = {
        "iss": "https://x/scim/v2", "iat": 1, "jti": "j", "aud": "a", "txn": "t",
        "sub_id": {"format": "scim", "uri": "/Groups/g", "externalId": "e"},
        "events": {PREFIX + "prov:patch:full": {"version": 'W/"2"', "data": {
            "schemas": [], "Operations": [
                {"op": "add", "path": "members", "value": [{"value": "u"}]},
                {"op": "remove", "path": 'members[value eq "v"]'},
                {"op": "replace", "value": {"displayName": "Secret"}},
            ]}}},
    }  # fmt: skip
    out = notice(claims)
    assert {k: out[k] for k in ("iss", "iat", "jti", "aud", "txn")} == {
        "iss": "https://x/scim/v2", "iat": 1, "jti": "j", "aud": "a", "txn": "t",
    }  # fmt: skip
    assert out["sub_id"] == {"format": "scim", "uri": "/Groups/g"}
    assert out["events"] == {
        PREFIX + "prov:patch:notice": {"version": 'W/"2"', "attributes": ["members", "displayName"]}
    }


async def test_an_acknowledgement_wakes_the_producer_of_a_full_outbox(
    client: Client,
    database: Database,
    tenant: IssuedToken,
    auth: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(producer_module, "MAX_PENDING", 2)
    producer = client.server.app[PRODUCER]
    async with database.pool.acquire() as conn:
        stream = await streams.create(
            conn, tenant="acme", name="cap", endpoint=None, events=["prov:create"],
            full=False, scope_group=None,
        )  # fmt: skip
    producer.poll_interval = 3600.0  # only a notification wakes it now
    for n in range(2):
        await create_user(client, auth, user_name=f"u{n}@example.com")
        await _until(client, stream, n + 1)
    held = producer.held
    await create_user(client, auth, user_name="third@example.com")
    deadline = time.monotonic() + DEADLINE
    while producer.held == held:  # until the producer has found the outbox full
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    r = await client.post(
        f"/events/{stream['id']}",
        json={"ack": list(await _poll(client, stream, [])), "maxEvents": 10},
        headers={"Authorization": f"Bearer {stream['token']}"},
    )  # acknowledges both, then waits (long poll) for what the woken producer makes
    assert r.status == 200
    (token,) = (await r.json())["sets"].values()
    assert claims_of(token)["sub_id"]["uri"].startswith("/Users/")


async def test_deleting_a_stream_deletes_its_pending_sets(
    client: Client, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    """feed_sets has no foreign key to its stream (migration 0028): the deletion does it."""
    async with database.pool.acquire() as conn:
        for name in ("gone", "kept"):
            await streams.create(
                conn, tenant="acme", name=name, endpoint=None, events=streams.parse_events(None),
                full=False, scope_group=None,
            )  # fmt: skip
    await create_user(client, auth, user_name="ada@example.com")
    pending = "SELECT count(*) FROM feed_sets f JOIN feed_streams s ON s.id = f.stream_id"
    deadline = time.monotonic() + DEADLINE
    while await database.pool.fetchval(pending) < 2:
        assert time.monotonic() < deadline, "the producer did not produce"
        await asyncio.sleep(0.05)
    async with database.pool.acquire() as conn:
        await streams.delete(conn, "acme", "gone")
    assert await database.pool.fetchval("SELECT count(*) FROM feed_sets") == 1
    assert await database.pool.fetchval(pending) == 1


async def test_acknowledgements_remove_exactly_the_sets_they_name(
    client: Client, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    """The oldest pending SETs acknowledged go by their range (poll._acknowledge); any other
    acknowledgement (out of order, a part, twice, unknown) removes exactly what it names."""
    async with database.pool.acquire() as conn:
        stream = await streams.create(
            conn, tenant="acme", name="acks", endpoint=None, events=streams.parse_events(None),
            full=False, scope_group=None,
        )  # fmt: skip
    for name in ("a", "b", "c", "d", "e"):
        await create_user(client, auth, user_name=f"{name}@example.com")
    a, b, c, d, e = list(await _until(client, stream, 5))
    assert list(await _poll(client, stream, [b, "unknown"])) == [a, c, d, e]
    assert list(await _poll(client, stream, [a, c])) == [d, e]  # the oldest: by range
    assert list(await _poll(client, stream, [a, e])) == [d]  # `a` twice, `e` not the oldest
    assert list(await _poll(client, stream, [d])) == []
    delivered = "SELECT delivered FROM feed_delivered WHERE stream_id = $1"
    assert await database.pool.fetchval(delivered, uuid.UUID(stream["id"])) == 5
