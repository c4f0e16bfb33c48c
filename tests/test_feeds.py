"""SCIM event feeds end to end: a push receiver on 127.0.0.1 and a poll client get the same
signed SETs in the same order, across a receiver failure and a server restart."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from infra.config import Settings
from infra.database import Database
from infra.tenants import IssuedToken
from service.app import create_app
from service.feeds import streams
from service.feeds.config import FEED_SETTINGS
from service.feeds.keys import rotate
from service.feeds.push import backoff
from service.feeds.sets import PREFIX
from tests.test_entra_groups import create_group, patch_group
from tests.test_entra_users import create as create_user
from tests.test_entra_users import patch as patch_user

Client = TestClient[Any, Any]


class Receiver:
    """An RFC 8935 push receiver: 202 for each SET, or 500 while `failing`."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.failing = False
        self.refused = 0

    async def handle(self, request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/secevent+jwt"
        body = (await request.read()).decode()
        if self.failing:
            self.refused += 1
            return web.Response(status=500)
        if body not in self.tokens:  # a retried SET the receiver has already is a duplicate
            self.tokens.append(body)
        return web.Response(status=202)


@asynccontextmanager
async def serving(settings: Settings, database: Database) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(settings, database), host="127.0.0.1")) as c:
        yield c


async def _poll(client: Client, stream: str, token: str, acks: list[str]) -> dict[str, Any]:
    r = await client.post(
        f"/events/{stream}",
        json={"ack": acks, "maxEvents": 5, "returnImmediately": False},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status == 200, await r.text()
    return dict(await r.json())


async def _collect(
    client: Client, stream: str, token: str, got: list[str], want: int, pending: list[str]
) -> None:
    """Poll (acknowledging what the last poll gave) until `want` SETs have arrived."""
    deadline = time.monotonic() + 30
    while len(got) < want:
        assert time.monotonic() < deadline, f"{len(got)} of {want} SETs"
        reply = await _poll(client, stream, token, pending)
        pending.clear()
        for jti, token_ in reply["sets"].items():
            got.append(token_)
            pending.append(jti)


def _verify(tokens: list[str], jwks: dict[str, Any]) -> list[dict[str, Any]]:
    keys = {k["kid"]: jwt.PyJWK(k) for k in jwks["keys"]}
    out = []
    for token in tokens:
        header = jwt.get_unverified_header(token)
        assert header["alg"] == "ES256" and header["typ"] == "secevent+jwt"
        out.append(
            jwt.decode(
                token,
                keys[header["kid"]].key,
                algorithms=["ES256"],
                options={"verify_aud": False},
            )
        )
    return out


def _shape(claims: list[dict[str, Any]]) -> list[tuple[str, str, tuple[str, ...]]]:
    return [
        (c["txn"], c["sub_id"]["uri"], tuple(sorted(u.removeprefix(PREFIX) for u in c["events"])))
        for c in claims
    ]


async def test_push_and_poll_get_the_same_signed_sets_across_failure_and_restart(
    settings: Settings,
    database: Database,
    tenant: IssuedToken,
    auth: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SCIMLEDGER_FEED_ALLOW_PRIVATE", "1")
    monkeypatch.setattr(FEED_SETTINGS, "retry_base", 0.05)
    monkeypatch.setattr(FEED_SETTINGS, "retry_max", 0.2)
    monkeypatch.setattr(FEED_SETTINGS, "failing_after", 0.3)
    monkeypatch.setattr(FEED_SETTINGS, "max_wait", 0.5)
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/set", receiver.handle)
    async with TestServer(app, host="127.0.0.1") as push_server:
        url = str(push_server.make_url("/set"))
        async with database.pool.acquire() as conn:
            polled = await streams.create(
                conn, tenant="acme", name="warehouse", endpoint=None,
                events=streams.parse_events(None), full=False, scope_group=None,
            )
            await streams.create(
                conn, tenant="acme", name="badges", endpoint=url,
                events=streams.parse_events(None), full=False, scope_group=None,
            )
        got_poll: list[str] = []
        acks: list[str] = []
        async with serving(settings, database) as client:
            user = await create_user(client, auth)
            await patch_user(client, auth, user["id"],
                             {"op": "replace", "path": "displayName", "value": "Jo"})
            receiver.failing = True
            await patch_user(client, auth, user["id"],
                             {"op": "replace", "path": "active", "value": False})
            group = await create_group(client, auth)
            await patch_group(client, auth, group["id"],
                              {"op": "add", "path": "members", "value": [{"value": user["id"]}]})
            # The receiver stays down past failing_after: the stream shows failing.
            deadline = time.monotonic() + 10
            while True:
                async with database.pool.acquire() as conn:
                    shown = await streams.show(conn, "acme", "badges")
                if shown["state"] == "failing":
                    break
                assert time.monotonic() < deadline, shown
                await asyncio.sleep(0.1)
            assert receiver.refused >= 2 and shown["pending"] >= 1
            receiver.failing = False
            await _collect(client, polled["id"], polled["token"], got_poll, 3, acks)
        # A restart: the first server is gone; unacknowledged SETs come again, same jti.
        async with serving(settings, database) as client:
            await patch_group(client, auth, group["id"],
                              {"op": "remove", "path": f'members[value eq "{user["id"]}"]'})
            r = await client.delete(f"/scim/v2/Users/{user['id']}", headers=auth)
            assert r.status == 204
            await _collect(client, polled["id"], polled["token"], got_poll, 7, acks)
            await _poll(client, polled["id"], polled["token"], acks)  # the last acks
            deadline = time.monotonic() + 15
            while len(receiver.tokens) < 7:
                assert time.monotonic() < deadline, len(receiver.tokens)
                await asyncio.sleep(0.1)
            # The failing push stream left a provisioning-log entry (asynchronous projection:
            # the restarted server's audit runner takes the lead first; slow on a busy machine).
            deadline = time.monotonic() + 60
            while not await database.pool.fetchval(
                "SELECT count(*) FROM audit_entries"
                " WHERE status = 'failure' AND error_reason LIKE $1",
                "push stream % failing: HTTP 500",
            ):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            r = await client.get("/.well-known/jwks.json")
            assert r.status == 200
            jwks = await r.json(content_type=None)
            async with database.pool.acquire() as conn:
                shown = await streams.show(conn, "acme", "badges")
                left = await conn.fetchval("SELECT count(*) FROM feed_sets")
        assert shown["state"] == "active" and shown["delivered"] == 7
        assert left == 0
    poll_claims = _verify(got_poll, jwks)
    push_claims = _verify(receiver.tokens, jwks)
    assert _shape(poll_claims) == _shape(push_claims)
    assert [s[1:] for s in _shape(poll_claims)] == [
        (f"/Users/{user['id']}", ("prov:create:notice",)),
        (f"/Users/{user['id']}", ("prov:patch:notice",)),
        (f"/Users/{user['id']}", ("prov:deactivate", "prov:patch:notice")),
        (f"/Groups/{group['id']}", ("prov:create:notice",)),
        (f"/Groups/{group['id']}", ("prov:patch:notice",)),
        (f"/Groups/{group['id']}", ("prov:patch:notice",)),
        (f"/Users/{user['id']}", ("prov:delete",)),
    ]
    assert len({c["jti"] for c in poll_claims + push_claims}) == 14
    assert {c["aud"] for c in poll_claims} == {poll_claims[0]["aud"]}
    assert poll_claims[0]["aud"].endswith(f"/events/{polled['id']}")
    assert all(c["iss"].endswith("/scim/v2") for c in poll_claims)


async def test_a_poll_token_polls_its_own_stream_only(
    client: Client, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    async with database.pool.acquire() as conn:
        mine = await streams.create(
            conn, tenant="acme", name="a", endpoint=None,
            events=["prov:create"], full=True, scope_group=None,
        )
        other = await streams.create(
            conn, tenant="acme", name="b", endpoint=None,
            events=["prov:create"], full=True, scope_group=None,
        )
    bearer = {"Authorization": f"Bearer {mine['token']}"}
    r = await client.post(f"/events/{other['id']}", json={}, headers=bearer)
    assert r.status == 403 and (await r.json())["err"] == "access_denied"
    r = await client.post(f"/events/{mine['id']}", json={}, headers=auth)
    assert r.status == 403
    r = await client.get("/scim/v2/Users", headers=bearer)
    assert r.status == 403
    for body in ({"maxEvents": -1}, {"ack": "x"}, {"returnImmediately": "yes"}, [1]):
        r = await client.post(f"/events/{mine['id']}", json=body, headers=bearer)
        assert r.status == 400 and (await r.json())["err"] == "invalid_request", body
    user = await create_user(client, auth)
    got: list[str] = []
    await _collect(client, mine["id"], mine["token"], got, 1, [])
    claims = jwt.decode(got[0], options={"verify_signature": False})
    data = claims["events"][PREFIX + "prov:create:full"]["data"]
    assert data["id"] == user["id"] and data["userName"] == user["userName"]
    # Not acknowledged: the same SET (same jti) comes again.
    again = await _poll(client, mine["id"], mine["token"], [])
    assert list(again["sets"].values()) == got
    r = await client.get("/scim/v2/ServiceProviderConfig", headers=auth)
    events = (await r.json(content_type=None))["securityEvents"]
    assert events["asyncRequest"] == "none" and PREFIX + "prov:patch:full" in events["eventUris"]


async def test_a_group_scoped_stream_adds_and_removes_members(
    client: Client, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    group = await create_group(client, auth)
    inside = await create_user(client, auth)
    outside = await create_user(client, auth, user_name="out@example.com")
    async with database.pool.acquire() as conn:
        scoped = await streams.create(
            conn, tenant="acme", name="crm", endpoint=None,
            events=streams.parse_events(None), full=False, scope_group=uuid.UUID(group["id"]),
        )
    await patch_group(client, auth, group["id"],
                      {"op": "add", "path": "members", "value": [{"value": inside["id"]}]})
    await patch_user(client, auth, inside["id"],
                     {"op": "replace", "path": "displayName", "value": "In"})
    await patch_user(client, auth, outside["id"],
                     {"op": "replace", "path": "displayName", "value": "Out"})
    await patch_group(client, auth, group["id"],
                      {"op": "remove", "path": f'members[value eq "{inside["id"]}"]'})
    await patch_user(client, auth, inside["id"],
                     {"op": "replace", "path": "displayName", "value": "Gone"})
    got: list[str] = []
    unacknowledged: list[str] = []
    await _collect(client, scoped["id"], scoped["token"], got, 5, unacknowledged)
    shapes = [s[1:] for s in _shape([jwt.decode(t, options={"verify_signature": False})
                                     for t in got])]
    assert shapes == [
        (f"/Groups/{group['id']}", ("prov:patch:notice",)),
        (f"/Users/{inside['id']}", ("feed:add",)),
        (f"/Users/{inside['id']}", ("prov:patch:notice",)),
        (f"/Groups/{group['id']}", ("prov:patch:notice",)),
        (f"/Users/{inside['id']}", ("feed:remove",)),
    ]
    more = await _poll(client, scoped["id"], scoped["token"], [])
    # Only what the last poll gave (not acknowledged yet: the SETs may have come over several
    # polls), nothing else: the outsider and the change after the removal are out of scope.
    assert sorted(more["sets"]) == sorted(unacknowledged)


async def test_a_rotated_key_stays_published_until_its_sets_are_acknowledged(
    client: Client, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    async with database.pool.acquire() as conn:
        stream = await streams.create(
            conn, tenant="acme", name="a", endpoint=None,
            events=["prov:create"], full=False, scope_group=None,
        )
    await create_user(client, auth)
    got: list[str] = []
    await _collect(client, stream["id"], stream["token"], got, 1, [])
    old = jwt.get_unverified_header(got[0])["kid"]
    async with database.pool.acquire() as conn:
        new = await rotate(conn, tenant.tenant_id)
    assert new != old

    async def kids() -> set[str]:
        r = await client.get("/.well-known/jwks.json")
        return {k["kid"] for k in (await r.json(content_type=None))["keys"]}

    assert await kids() == {old, new}  # the SET signed by the old key still waits
    await create_user(client, auth, user_name="second@example.com")
    reply = await _poll(client, stream["id"], stream["token"], list(_jtis(got)))
    (token,) = reply["sets"].values()
    assert jwt.get_unverified_header(token)["kid"] == new
    _verify([token], {"keys": (await (await client.get("/.well-known/jwks.json")).json(
        content_type=None))["keys"]})
    assert await kids() == {new}


def _jtis(tokens: list[str]) -> list[str]:
    return [jwt.decode(t, options={"verify_signature": False})["jti"] for t in tokens]


async def test_a_stream_from_the_start_catches_up_and_shows_its_progress(
    client: Client, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    first = await create_user(client, auth)
    second = await create_user(client, auth, user_name="second@example.com")
    async with database.pool.acquire() as conn:
        stream = await streams.create(
            conn, tenant="acme", name="late", endpoint=None,
            events=["prov:create"], full=False, scope_group=None, from_start=True,
        )
    got: list[str] = []
    await _collect(client, stream["id"], stream["token"], got, 2, [])
    uris = [jwt.decode(t, options={"verify_signature": False})["sub_id"]["uri"] for t in got]
    assert uris == [f"/Users/{first['id']}", f"/Users/{second['id']}"]
    async with database.pool.acquire() as conn:
        shown = await streams.show(conn, "acme", "late")
    assert shown["behind"] == 0 and shown["produced"] == 2 and shown["pending"] == 2


def test_push_retries_back_off_exponentially_with_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FEED_SETTINGS, "retry_base", 1.0)
    monkeypatch.setattr(FEED_SETTINGS, "retry_max", 60.0)
    for attempt, full in ((1, 1.0), (2, 2.0), (4, 8.0), (7, 60.0), (1000, 60.0)):
        delays = {backoff(attempt) for _ in range(50)}
        assert all(full / 2 <= d <= full for d in delays), (attempt, delays)
        assert len(delays) > 1  # jittered
