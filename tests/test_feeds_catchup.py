"""Feeds, issue 18's second round: a catch-up built in worker processes makes the same SETs as
the producer alone; full data of creates and group puts is the whole resource; signing keys are
sealed at rest; a push connects to the address its check vetted (DNS rebinding)."""

from __future__ import annotations

import base64
import socket
import uuid
from pathlib import Path

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from domain.user import User
from infra.config import Settings
from infra.database import Database
from infra.tenants import IssuedToken
from service.feeds import sealing, sets, streams
from service.feeds.keys import current_key, jwks
from service.feeds.producer import Producer
from service.feeds.push import Pusher
from service.feeds.targets import PinnedResolver, TargetRefused, check_resolved
from tests.test_entra_groups import GROUP, create_group
from tests.test_entra_users import create as create_user
from tests.test_entra_users import headers
from tests.test_entra_users import patch as patch_user
from tests.test_extensions import CUSTOM, custom_user
from tests.test_feeds import Client, _verify, serving

ALL = streams.parse_events(None)
BASE = "https://scim.example.com/scim/v2"


async def _stream(database: Database, name: str, *, full: bool) -> uuid.UUID:
    async with database.pool.acquire() as conn:
        created = await streams.create(
            conn, tenant="acme", name=name, endpoint=None, events=ALL, full=full,
            scope_group=None, from_start=True,
        )
    return uuid.UUID(created["id"])


async def _produce(database: Database, producer: Producer, stream_id: uuid.UUID) -> list[str]:
    async with database.pool.acquire() as conn:
        while await producer.step(conn, stream_id):
            pass
        rows = await conn.fetch(
            "SELECT token FROM feed_sets WHERE stream_id = $1 ORDER BY seq", stream_id
        )
    return [r["token"] for r in rows]


async def _history(client: Client, auth: dict[str, str]) -> tuple[str, str, str]:
    """Users (one with a custom extension), a group with members, the group replaced (PUT)."""
    users = [await create_user(client, auth, user_name=f"u{i}@example.com") for i in range(6)]
    custom = await client.post("/scim/v2/Users", json=custom_user(), headers=headers(auth))
    assert custom.status == 201, await custom.text()
    await patch_user(client, auth, users[0]["id"], {"op": "replace", "path": "title", "value": "X"})
    group = await create_group(client, auth)
    put = await client.put(
        f"/scim/v2/Groups/{group['id']}",
        json={
            "schemas": [GROUP],
            "displayName": "Sales",
            "members": [{"value": users[1]["id"]}, {"value": users[2]["id"]}],
        },
        headers=headers(auth),
    )
    assert put.status == 200, await put.text()
    return group["id"], users[1]["id"], (await custom.json(content_type=None))["id"]


async def test_a_full_stream_catching_up_carries_whole_resources(
    settings: Settings, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    async with serving(settings, database) as client:
        group_id, member, custom_id = await _history(client, auth)
    # The app is gone (its producer too): this producer is the only one.
    alone = Producer(database, lambda: BASE)
    for full in (False, True):
        stream = await _stream(database, f"a{full}", full=full)
        tokens = await _produce(database, alone, stream)
        async with database.pool.acquire() as conn:
            keys = await jwks(conn)
        by_alone = _verify(tokens, keys)
        assert len(by_alone) >= 10
        assert len({c["jti"] for c in by_alone}) == len(by_alone)
    # The full stream (the last one): the group's put carries its members; the custom
    # extension (a UserAttributesChanged after the UserProvisioned) is in the create's data.
    put = [c for c in by_alone if sets.PUT + ":full" in c["events"]]
    assert put and put[-1]["sub_id"]["uri"] == f"/Groups/{group_id}"
    data = put[-1]["events"][sets.PUT + ":full"]["data"]
    assert {m["value"] for m in data["members"]} >= {member}
    created = next(
        c for c in by_alone
        if c["sub_id"]["uri"] == f"/Users/{custom_id}" and sets.CREATE + ":full" in c["events"]
    )
    assert created["events"][sets.CREATE + ":full"]["data"][CUSTOM] == {"CustomAttribute": "blue"}


async def test_create_notice_names_extension_attributes_of_the_same_request(
    settings: Settings, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    async with serving(settings, database) as client:
        r = await client.post("/scim/v2/Users", json=custom_user(), headers=headers(auth))
        assert r.status == 201
    stream = await _stream(database, "notice", full=False)
    (token,) = await _produce(database, Producer(database, lambda: BASE), stream)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert CUSTOM in claims["events"][sets.CREATE + ":notice"]["attributes"]


def test_create_notice_names_from_state_agree_with_the_document() -> None:
    from domain.user import User

    state = {
        "userName": "jdoe",
        "externalId": "x1",
        "displayName": "J",
        "title": "Boss",
        "name": {"givenName": "J", "familyName": "D"},
        "active": True,
        "emails": [{"type": "work", "value": "j@example.com"}],
        "phoneNumbers": [{"type": "work", "value": "+1 555"}],
        "enterprise": {"department": "Sales", "employeeNumber": "7"},
        "manager": str(uuid.uuid4()),
        CUSTOM: {"CustomAttribute": "blue"},
    }
    uid = uuid.uuid4()
    events = list(User.provision(uid, uuid.uuid4(), state).collect_events())
    (change,) = sets.changes_of(events)
    fast = sets.created_names(change)
    assert fast == sets.create_attributes(sets.user_data(uid, events[0].mutate(None).state_view))
    assert fast[0] == "id" and sets.ENTERPRISE_SCHEMA + ":department" in fast
    # Named once per shape (sets._NAMED): users of one shape and of others, named again from
    # the cache, still agree with their documents.
    variants = [
        state,
        {**state, "userName": "other", "title": "Clerk", "manager": str(uuid.uuid4())},
        {k: v for k, v in state.items() if k not in ("manager", "title")},
        {**state, "enterprise": {"costCenter": "9"}},
        {"userName": "plain"},
        {"userName": "plain2", "displayName": "P"},
    ]
    for variant in variants * 2:
        uid = uuid.uuid4()
        events = list(User.provision(uid, uuid.uuid4(), variant).collect_events())
        (change,) = sets.changes_of(events)
        document = sets.user_data(uid, events[0].mutate(None).state_view)
        assert sets.created_names(change) == sets.create_attributes(document), variant


async def test_signing_keys_are_sealed_at_rest(
    database: Database, tenant: IssuedToken, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SCIMLEDGER_FEED_KEY", raising=False)
    monkeypatch.delenv("SCIMLEDGER_MASTER_KEY", raising=False)
    monkeypatch.setenv("SCIMLEDGER_DATA_DIR", str(tmp_path))
    async with database.pool.acquire() as conn:
        key = await current_key(conn, tenant.tenant_id)
        stored = await conn.fetchval("SELECT private_pem FROM feed_keys WHERE kid = $1", key.kid)
        assert stored.startswith(sealing.PREFIX) and "PRIVATE KEY" not in stored
        assert (tmp_path / sealing.KEY_FILE).stat().st_mode & 0o777 == 0o600
        # A signature by the loaded key checks against the published one.
        token = key.sign({"iss": "x", "jti": "1", "events": {}})
        _verify([token], await jwks(conn))
        # A key stored before sealing (plain PEM) is read, and sealed when loaded.
        await conn.execute(
            "UPDATE feed_keys SET private_pem = $2 WHERE kid = $1", key.kid, key.private_pem
        )
        assert (await current_key(conn, tenant.tenant_id)).kid == key.kid
        again = await conn.fetchval("SELECT private_pem FROM feed_keys WHERE kid = $1", key.kid)
        assert again.startswith(sealing.PREFIX)
        # Another sealing key (here from the master key) does not open it: a clear error.
        monkeypatch.setenv("SCIMLEDGER_MASTER_KEY", "another deployment's secret")
        with pytest.raises(sealing.SealError, match="does not open"):
            await current_key(conn, tenant.tenant_id)
        # The same row under another kid does not open either (the kid is authenticated).
        monkeypatch.delenv("SCIMLEDGER_MASTER_KEY")
        with pytest.raises(sealing.SealError):
            sealing.unseal("another-kid", again)
        bad = base64.urlsafe_b64encode(b"short").decode()
        monkeypatch.setenv("SCIMLEDGER_FEED_KEY", bad)
        with pytest.raises(sealing.SealError, match="32 bytes"):
            sealing.sealing_key()


async def test_a_push_connects_to_the_address_its_check_vetted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    received: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/set", handle)
    async with TestServer(app, host="127.0.0.1") as receiver:
        pusher = Pusher(None)  # type: ignore[arg-type]
        resolver: PinnedResolver = pusher.resolver
        monkeypatch.setenv("SCIMLEDGER_FEED_ALLOW_PRIVATE", "0")
        # Not vetted: refused, with no lookup.
        with pytest.raises(OSError, match="not vetted"):
            await resolver.resolve("feeds.example.com", 443)
        # This machine's name resolves (/etc/hosts) to 127.0.0.1, where the receiver listens;
        # pinned to another address, the connection goes there and not by a new lookup.
        url = f"http://{socket.gethostname()}:{receiver.port}/set"
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
        ) as session:
            resolver.pin(url, ["127.0.0.2"])
            outcome = await pusher._post(session, url, "t0")
            assert outcome is not None and outcome[0] == "retry" and received == []
            resolver.pin(url, ["127.0.0.1"])
            assert await pusher._post(session, url, "t1") is None
            assert received == [b"t1"]
    # The check itself refuses a name that resolves to a private address, and pins nothing.
    monkeypatch.setenv("SCIMLEDGER_FEED_ALLOW_PRIVATE", "0")
    with pytest.raises(TargetRefused, match="private or loopback"):
        await check_resolved(f"https://{socket.gethostname()}/set")  # /etc/hosts: 127.0.0.1


async def test_two_requests_committed_in_one_transaction_get_two_txns(
    database: Database, tenant: IssuedToken
) -> None:
    """RFC 9967 §2.2: `txn` names the SCIM request, not the database transaction. A group
    commit holds several requests in one transaction: each request's SETs share its `txn`, the
    next request's have their own, and the log's order holds."""
    users = [User.provision(uuid.uuid4(), tenant.tenant_id, {"userName": f"t{i}@x.com"})
             for i in range(3)]  # fmt: skip
    store = database.store
    async with database.pool.acquire() as conn, conn.transaction():
        first = await store.append(conn, tenant.tenant_id, [*users[0].collect_events(),
                                   *users[1].collect_events()], "request-a")  # fmt: skip
        second = await store.append(conn, tenant.tenant_id, users[2].collect_events(), "request-b")
    assert {r.transaction_id for r in first + second} == {first[0].transaction_id}
    stream = await _stream(database, "txn", full=False)
    tokens = await _produce(database, Producer(database, lambda: BASE), stream)
    claims = [jwt.decode(t, options={"verify_signature": False}) for t in tokens]
    assert [(c["sub_id"]["uri"], c["txn"]) for c in claims] == [
        (f"/Users/{users[0].id}", "request-a"),
        (f"/Users/{users[1].id}", "request-a"),
        (f"/Users/{users[2].id}", "request-b"),
    ]
