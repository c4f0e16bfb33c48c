"""Tenants and tokens: disable, rotate, revoke, expire; refused at once on every instance; last
use recorded cheaply; the secret never listed and never logged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from infra.config import Settings
from infra.database import Database, create_pool
from infra.tenants import Authenticator, IssuedToken, create_tenant, issue_token, revoke_token
from service.app import create_app
from tests.conftest import database_on
from tests.test_audit_web import sign_in
from tests.test_cli import _serve, _stop, run
from tests.test_entra_users import entra_user

Client = TestClient[Any, Any]
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
SPC = "/scim/v2/ServiceProviderConfig"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def status(client: Client, token: str, path: str = SPC) -> int:
    r = await client.get(path, headers=bearer(token))
    body = await r.json(content_type=None)
    if r.status == 401:
        assert body["schemas"] == [ERROR] and body["status"] == "401"
        assert r.headers["Content-Type"].startswith("application/scim+json")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    return r.status


@pytest.fixture
async def second_instance(settings: Settings, fresh_dsn: str) -> AsyncIterator[Client]:
    """Another app on the same database, with its own pool: a second running instance."""
    async with database_on(fresh_dsn, max_size=5) as database:
        app = create_app(replace(settings, run_projections=False), database)
        async with TestClient(TestServer(app, host="127.0.0.1")) as c:
            yield c


async def test_cli_disable_and_enable_a_tenant(fresh_dsn: str, client: Client) -> None:
    code, out, err = await run(
        "tenants", "create", "contoso", "--json", "--database-url", fresh_dsn
    )
    assert code == 0, err
    scim_token = json.loads(out)["token"]
    code, out, err = await run(
        "tokens", "create", "--tenant", "contoso", "--role", "audit", "--json",
        "--database-url", fresh_dsn,
    )  # fmt: skip
    assert code == 0, err
    assert len(out.splitlines()) == 1
    created = json.loads(out)
    assert {"id", "tenant", "token"} <= set(created) and created["tenant"] == "contoso"
    uuid.UUID(created["id"])
    audit_token = created["token"]
    assert await status(client, scim_token) == 200
    assert await status(client, audit_token, "/audit/v1/entries") == 200
    await sign_in(client, audit_token)  # a web session of the provisioning log
    assert "<h1>Provisioning log</h1>" in await (await client.get("/audit/")).text()

    code, out, err = await run("tenants", "disable", "contoso", "--database-url", fresh_dsn)
    assert code == 0, err
    assert out.strip() == "tenant contoso disabled"
    # Both roles, from the very next request; the web session ends too.
    assert await status(client, scim_token) == 401
    assert await status(client, audit_token, "/audit/v1/entries") == 401
    assert "Sign in to the provisioning log" in await (await client.get("/audit/")).text()
    code, out, _ = await run("tenants", "list", "--json", "--database-url", fresh_dsn)
    assert code == 0 and json.loads(out)["disabled"] is True
    code, out, _ = await run("tenants", "disable", "contoso", "--database-url", fresh_dsn)
    assert code == 0 and out.strip() == "tenant contoso was already disabled"

    code, out, err = await run("tenants", "enable", "contoso", "--database-url", fresh_dsn)
    assert code == 0 and out.strip() == "tenant contoso enabled", err
    assert await status(client, scim_token) == 200
    assert await status(client, audit_token, "/audit/v1/entries") == 200

    code, _, err = await run("tenants", "disable", "nobody", "--database-url", fresh_dsn)
    assert code == 1 and err.strip() == "scimledger: error: no tenant named 'nobody'"


async def test_rotation_revocation_expiry_and_disable_hold_on_every_instance(
    fresh_dsn: str,
    database: Database,
    tenant: IssuedToken,
    client: Client,
    second_instance: Client,
) -> None:
    instances = (client, second_instance)
    async with database.pool.acquire() as conn:
        rotated = await issue_token(conn, "acme", "provisioning", "rotated")
        expiring = await issue_token(conn, "acme", "provisioning", "short-lived")
        other = await create_tenant(conn, "fabrikam")
    # Several live tokens per tenant: the old and the new one both work during a rotation.
    for c in instances:
        for token in (tenant, rotated, expiring, other):
            assert await status(c, token.token) == 200
    r = await client.post(
        "/scim/v2/Users", json=entra_user("rotation@contoso.com"), headers=bearer(rotated.token)
    )
    assert r.status == 201
    user_path = f"/scim/v2/Users/{(await r.json(content_type=None))['id']}"
    # The old token sees what the new one wrote: same tenant.
    assert await status(second_instance, tenant.token, user_path) == 200

    # Revoke the old token with the CLI (another process): refused at once on both instances.
    code, out, err = await run("tokens", "revoke", str(tenant.id), "--database-url", fresh_dsn)
    assert code == 0 and out.strip() == f"revoked {tenant.id}", err
    for c in instances:
        assert await status(c, tenant.token) == 401
        assert await status(c, tenant.token, user_path) == 401
        assert await status(c, rotated.token, user_path) == 200
    code, _, err = await run("tokens", "revoke", str(tenant.id), "--database-url", fresh_dsn)
    assert code == 1 and f"no live token {tenant.id}" in err

    # Expiry: the moment it passes (set in the database, so the test waits for no clock).
    await database.pool.execute(
        "UPDATE tokens SET expires_at = now() - interval '1 second' WHERE id = $1", expiring.id
    )
    for c in instances:
        assert await status(c, expiring.token) == 401
        assert await status(c, rotated.token) == 200

    # Disabling a tenant refuses all its tokens on both instances, and no other tenant's.
    await database.pool.execute("UPDATE tenants SET disabled_at = now() WHERE name = 'acme'")
    for c in instances:
        assert await status(c, rotated.token) == 401
        assert await status(c, other.token) == 200


async def test_tokens_list_shows_last_use_and_never_the_secret(
    fresh_dsn: str, database: Database, tenant: IssuedToken, client: Client
) -> None:
    code, out, err = await run(
        "tokens", "create", "--tenant", "acme", "--name", "ci", "--expires", "90d", "--json",
        "--database-url", fresh_dsn,
    )  # fmt: skip
    assert code == 0, err
    ci = json.loads(out)
    assert await status(client, ci["token"]) == 200

    code, out, err = await run(
        "tokens", "list", "--tenant", "acme", "--json", "--database-url", fresh_dsn
    )
    assert code == 0, err
    rows = {row["name"]: row for row in map(json.loads, out.splitlines())}
    assert set(rows) == {"default", "ci"}
    assert rows["ci"]["role"] == "provisioning" and rows["ci"]["id"] == ci["id"]
    assert rows["ci"]["created_at"] and rows["ci"]["expires_at"] and rows["ci"]["last_used_at"]
    assert rows["default"]["last_used_at"] is None and rows["default"]["expires_at"] is None
    assert not {"token", "token_hash"} & set(rows["ci"])
    code, text, err = await run("tokens", "list", "--tenant", "acme", "--database-url", fresh_dsn)
    assert code == 0, err
    line = next(row for row in text.splitlines() if ci["id"] in row)
    assert "\tci\tprovisioning\t" in line and rows["ci"]["last_used_at"] in line
    for output in (out, text):
        assert ci["token"] not in output and tenant.token not in output
        assert ci["token"].removeprefix("scimledger_") not in output

    # At most one write per token per minute: a second request leaves last_used_at as it was.
    async def last_used() -> Any:
        return await database.pool.fetchval(
            "SELECT last_used_at FROM tokens WHERE id = $1", uuid.UUID(ci["id"])
        )

    first = await last_used()
    assert await status(client, ci["token"]) == 200
    assert await last_used() == first
    await database.pool.execute(
        "UPDATE tokens SET last_used_at = last_used_at - interval '2 minutes' WHERE id = $1",
        uuid.UUID(ci["id"]),
    )
    backdated = await last_used()
    assert await status(client, ci["token"]) == 200
    assert await last_used() > backdated


async def test_tokens_never_reach_the_log(
    fresh_dsn: str, database: Database, tenant: IssuedToken
) -> None:
    """Every request of a real `scimledger serve` logs a line; none carries a token."""
    async with database.pool.acquire() as conn:
        reader = await issue_token(conn, "acme", "audit", "compliance")
        revoked = await issue_token(conn, "acme", "provisioning", "old")
    await database.pool.execute("UPDATE tokens SET revoked_at = now() WHERE id = $1", revoked.id)
    proc, banner, port = await _serve("--database-url", fresh_dsn)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            user = entra_user("logged@contoso.com")
            by_name = '/scim/v2/Users?filter=userName eq "logged@contoso.com"'
            sent = [
                ("POST", "/scim/v2/Users", tenant.token, user, 201),
                ("GET", by_name, tenant.token, None, 200),
                ("POST", "/scim/v2/Users", tenant.token, user, 409),
                ("GET", SPC, revoked.token, None, 401),
                ("GET", SPC, tenant.token + "x", None, 401),
                ("GET", "/audit/v1/entries", reader.token, None, 200),
                ("GET", "/audit/v1/entries", tenant.token, None, 403),
            ]  # fmt: skip
            for method, path, token, body, expected in sent:
                async with http.request(method, base + path, json=body, headers=bearer(token)) as r:
                    assert r.status == expected, (path, await r.text())
            # The web pages' sign-in takes the token in a form.
            async with http.post(
                base + "/audit/sign-in",
                data={"token": reader.token},
                headers={"Origin": base},
                allow_redirects=False,
            ) as r:
                assert r.status in (302, 303), await r.text()
    finally:
        assert await _stop(proc) == 0
    assert proc.stdout is not None and proc.stderr is not None
    output = banner + (await proc.stdout.read()).decode() + (await proc.stderr.read()).decode()
    logged = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    requests = [entry for entry in logged if entry.get("event") == "request"]
    assert len(requests) == len(sent) + 1, output  # the log is really there
    for token in (tenant.token, reader.token, revoked.token):
        assert token not in output
        assert token.removeprefix("scimledger_") not in output


class _HeldPool:
    """The real pool, with a gate between a lookup's result and its return: a lookup can be
    kept in flight after PostgreSQL answered it (the gate starts closed). Counts the lookups."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.lookups = 0
        self.borrowed = self.returned = 0
        self.gate = asyncio.Event()
        self.answered = asyncio.Event()
        # Token checks through this pool, as the middleware makes them.
        self.check = Authenticator(lambda: self)  # type: ignore[arg-type, return-value]

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        self.lookups += 1
        rows = await self.pool.fetch(sql, *args)
        self.answered.set()
        await self.gate.wait()
        return rows

    async def execute(self, sql: str, *args: object) -> str:
        return await self.pool.execute(sql, *args)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[_HeldPool]:
        """Lookups run on a connection of the pool: this one's are the gated statements."""
        self.borrowed += 1
        try:
            yield self
        finally:
            self.returned += 1


async def test_concurrent_requests_share_a_lookup_and_each_gets_its_principal(
    database: Database, tenant: IssuedToken
) -> None:
    async with database.pool.acquire() as conn:
        other = await create_tenant(conn, "fabrikam")
    held = _HeldPool(database.pool)
    check = held.check
    tokens = [tenant.token, other.token, "scimledger_not-a-token"] * 20
    first = asyncio.create_task(check(tenant.token))
    await held.answered.wait()
    # 60 requests arrive while the first lookup is in flight: all wait for ONE more lookup.
    rest = [asyncio.create_task(check(t)) for t in tokens]
    await asyncio.sleep(0)
    held.gate.set()
    got = await asyncio.gather(first, *rest)
    assert held.lookups == 2
    assert got[0] is not None and got[0].tenant_id == tenant.tenant_id
    for token, principal in zip(tokens, got[1:], strict=True):
        if token == tenant.token:
            assert principal is not None and principal.tenant_name == "acme"
        elif token == other.token:
            assert principal is not None and principal.tenant_name == "fabrikam"
        else:
            assert principal is None
    # Alone, a request gets a lookup of its own at once.
    assert await check(other.token) is not None and held.lookups == 3


async def test_lookups_that_follow_each_other_share_a_connection(
    database: Database, tenant: IssuedToken
) -> None:
    """A busy server's lookups, each starting as the one before ends, run on one connection;
    it goes back to the pool once no request waits."""
    held = _HeldPool(database.pool)
    check = held.check
    first = asyncio.create_task(check(tenant.token))
    await held.answered.wait()
    second = asyncio.create_task(check(tenant.token))  # waits for the next lookup
    await asyncio.sleep(0)
    held.gate.set()
    assert all(p is not None for p in await asyncio.gather(first, second))
    assert (held.lookups, held.borrowed, held.returned) == (2, 1, 1)
    assert await check(tenant.token) is not None  # idle meanwhile: a connection borrowed again
    assert (held.lookups, held.borrowed, held.returned) == (3, 2, 2)


async def test_a_request_never_joins_a_lookup_that_began_before_it(
    database: Database, tenant: IssuedToken
) -> None:
    """A lookup in flight answered before the token was revoked; a request arriving after the
    revocation must not take that answer: it waits for a lookup of its own."""
    held = _HeldPool(database.pool)
    check = held.check
    before = asyncio.create_task(check(tenant.token))
    await held.answered.wait()  # PostgreSQL has said: live
    async with database.pool.acquire() as conn:
        assert await revoke_token(conn, tenant.id)
    after = asyncio.create_task(check(tenant.token))
    await asyncio.sleep(0)
    held.gate.set()
    assert (await before) is not None  # it arrived before the revocation
    assert (await after) is None
    assert held.lookups == 2


async def test_a_failed_lookup_fails_each_waiter_and_the_next_one_works(
    database: Database, fresh_dsn: str, tenant: IssuedToken
) -> None:
    closed = await create_pool(fresh_dsn, min_size=1, max_size=1)
    await closed.close()
    pools = [closed, database.pool]
    check = Authenticator(lambda: pools[0])
    results = await asyncio.gather(*(check(tenant.token) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, asyncpg.InterfaceError) for r in results), results
    pools.pop(0)
    assert (await check(tenant.token)) is not None


async def test_a_cancelled_request_leaves_the_others_their_answer(
    database: Database, tenant: IssuedToken
) -> None:
    held = _HeldPool(database.pool)
    check = held.check
    gone = asyncio.create_task(check(tenant.token))
    stays = asyncio.create_task(check(tenant.token))
    await held.answered.wait()
    gone.cancel()
    held.gate.set()
    assert (await stays) is not None
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_a_lookup_cancelled_at_shutdown_cancels_its_waiters(
    database: Database, tenant: IssuedToken
) -> None:
    held = _HeldPool(database.pool)
    check = held.check
    waiters = [asyncio.create_task(check(tenant.token)) for _ in range(3)]
    await held.answered.wait()
    late = asyncio.create_task(check(tenant.token))  # queued for the next lookup
    await asyncio.sleep(0)
    lookups = check._task
    assert lookups is not None
    lookups.cancel()
    for task in [*waiters, late]:
        with pytest.raises(asyncio.CancelledError):
            await task
    # A new lookup starts for the next request.
    held.gate.set()
    assert (await check(tenant.token)) is not None
