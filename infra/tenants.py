"""Tenants and their bearer tokens.

A token is 32 random bytes shown once; only its SHA-256 digest is stored. The digest of a
random 256-bit secret needs no slow hash (there is nothing to brute-force), and lookup by digest
leaks nothing useful through timing (the time to find a digest says nothing of the secret).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from infra.eventstore import Conn

TOKEN_PREFIX = "scimledger_"
ROLES = ("provisioning", "audit")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant a token belongs to, and what the token may do."""

    tenant_id: uuid.UUID
    tenant_name: str
    token_id: uuid.UUID
    token_name: str
    role: str
    # What the tenant does with undeclared extension attributes: "keep" or "reject".
    undeclared: str = "keep"
    # The tenant's declared extension schemas: [{"resourceType": "User", "schema": {...}}].
    declared: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class IssuedToken:
    id: uuid.UUID
    tenant: str
    tenant_id: uuid.UUID
    token: str
    role: str
    name: str


class TenantExists(Exception):
    pass


class UnknownTenant(Exception):
    pass


def digest(token: str) -> bytes:
    # surrogateescape: a token read from invalid UTF-8 hashes to its bytes (and matches none).
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


async def create_tenant(conn: Conn, name: str) -> IssuedToken:
    """Create a tenant with one provisioning token."""
    async with conn.transaction():
        tenant_id = uuid.uuid4()
        try:
            await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, $2)", tenant_id, name)
        except asyncpg.UniqueViolationError:
            raise TenantExists(name) from None
        return await _issue(conn, tenant_id, name, "provisioning", "default")


async def issue_token(
    conn: Conn,
    tenant: str,
    role: str = "provisioning",
    name: str | None = None,
    expires_at: datetime | None = None,
) -> IssuedToken:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    if tenant_id is None:
        raise UnknownTenant(tenant)
    return await _issue(conn, tenant_id, tenant, role, name or role, expires_at)


async def _issue(
    conn: Conn,
    tenant_id: uuid.UUID,
    tenant: str,
    role: str,
    name: str,
    expires_at: datetime | None = None,
) -> IssuedToken:
    token = new_secret()
    token_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO tokens (id, tenant_id, name, role, token_hash, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        token_id,
        tenant_id,
        name,
        role,
        digest(token),
        expires_at,
    )
    return IssuedToken(token_id, tenant, tenant_id, token, role, name)


# When a token (alias k) of a tenant (alias t) may be used: every check of a token says this.
LIVE_TOKEN = (
    "k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())"
    " AND t.disabled_at IS NULL"
)


# `last_used_at` is written at most once per this interval per token, not on every request.
LAST_USED_RESOLUTION = "60 seconds"


_LOOKUP = (
    "SELECT k.id, k.name, k.role, k.token_hash, t.id AS tenant_id, t.name AS tenant_name,"
    " t.undeclared, (SELECT jsonb_agg(jsonb_build_object('resourceType', s.resource_type,"
    " 'schema', s.schema) ORDER BY lower(s.urn)) FROM tenant_schemas s"
    " WHERE s.tenant_id = t.id) AS declared, (k.last_used_at IS NULL OR k.last_used_at"
    f"  < now() - interval '{LAST_USED_RESOLUTION}') AS stale"
    " FROM tokens k JOIN tenants t ON t.id = k.tenant_id"
    f" WHERE k.token_hash = any($1::bytea[]) AND {LIVE_TOKEN}"
)
# Re-checked under the row lock: instances racing here write once between them.
_TOUCH = (
    "UPDATE tokens SET last_used_at = now() WHERE id = any($1::uuid[]) AND (last_used_at IS NULL"
    f" OR last_used_at < now() - interval '{LAST_USED_RESOLUTION}')"
)


async def authenticate_many(
    conn: Conn | asyncpg.Pool, digests: Sequence[bytes]
) -> dict[bytes, Principal]:
    """The principals of those digests (`digest(token)`) that are live tokens of enabled
    tenants, by digest; the others are absent. One statement, whatever their number."""
    rows = await conn.fetch(_LOOKUP, list(digests))
    found: dict[bytes, Principal] = {}
    stale: list[uuid.UUID] = []
    for row in rows:
        found[bytes(row["token_hash"])] = Principal(
            row["tenant_id"],
            row["tenant_name"],
            row["id"],
            row["name"],
            row["role"],
            row["undeclared"],
            tuple(row["declared"] or ()),
        )
        if row["stale"]:
            stale.append(row["id"])
    if stale:
        await conn.execute(_TOUCH, stale)
    return found


async def authenticate(conn: Conn | asyncpg.Pool, token: str) -> Principal | None:
    """The principal of a live token of an enabled tenant, or None.

    Nothing is cached: every request reads the token's row, so a revoked or expired token, or
    one of a disabled tenant, is refused from the next request on, on every instance.
    """
    wanted = digest(token)
    return (await authenticate_many(conn, [wanted])).get(wanted)


class Authenticator:
    """A server process's token checks: concurrent requests share one lookup statement.

    Nothing is cached. A request that comes while a lookup is in flight waits for the next
    one, which starts after it came, so it sees every revocation, expiry and disabled tenant
    committed before the request arrived, as a lookup of its own would. Alone, a request gets
    its lookup at once; under load (Entra's connections, a benchmark's 16) one statement and
    one round trip check every request that arrived meanwhile, instead of one each.
    """

    def __init__(self, pool: Callable[[], asyncpg.Pool]) -> None:
        self._pool = pool
        self._waiting: dict[bytes, list[asyncio.Future[Principal | None]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, token: str) -> Principal | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Principal | None] = loop.create_future()
        self._waiting.setdefault(digest(token), []).append(future)
        if self._task is None:
            self._task = loop.create_task(self._lookups())
        return await future

    async def _lookups(self) -> None:
        try:
            while self._waiting:
                # Lookups that follow each other (a busy server's) share one connection: a
                # pool's acquisition and release cost the front about what the lookup does.
                try:
                    async with self._pool().acquire() as conn:
                        while self._waiting and await self._lookup(conn):
                            pass
                except BaseException as e:  # no connection (an outage, a shutdown)
                    batch, self._waiting = self._waiting, {}
                    _fail(batch, e)
                    if not isinstance(e, Exception):
                        raise
        finally:
            self._task = None
            waiting, self._waiting = self._waiting, {}
            for _, future in _pending(waiting):  # only when cancelled (shutdown)
                future.cancel()

    async def _lookup(self, conn: Conn) -> bool:
        """One lookup for every request waiting; False if it failed (the connection with it,
        maybe: the next lookup takes another)."""
        batch, self._waiting = self._waiting, {}
        try:
            found = await authenticate_many(conn, list(batch))
        except BaseException as e:
            _fail(batch, e)
            if not isinstance(e, Exception):
                raise
            return False
        for wanted, future in _pending(batch):
            future.set_result(found.get(wanted))
        return True


def _fail(waiting: dict[bytes, list[asyncio.Future[Principal | None]]], e: BaseException) -> None:
    """Each waiter fails as its own lookup would have (503 for an outage), or is cancelled
    with it (shutdown)."""
    for _, future in _pending(waiting):
        if isinstance(e, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(e)


def _pending(
    waiting: dict[bytes, list[asyncio.Future[Principal | None]]],
) -> Iterator[tuple[bytes, asyncio.Future[Principal | None]]]:
    """(digest, future) for each request of `waiting` that still waits (not cancelled)."""
    return (
        (wanted, future)
        for wanted, futures in waiting.items()
        for future in futures
        if not future.done()
    )


async def set_tenant_disabled(conn: Conn, name: str, disabled: bool) -> bool:
    """Disable (or enable again) a tenant; False if it already was. Its tokens get 401 from
    the next request on, and its audit web sessions end; nothing of its data is touched."""
    tenant = await conn.fetchrow("SELECT id, disabled_at FROM tenants WHERE name = $1", name)
    if tenant is None:
        raise UnknownTenant(name)
    if (tenant["disabled_at"] is not None) == disabled:
        return False
    await conn.execute(
        "UPDATE tenants SET disabled_at = CASE WHEN $2 THEN now() END WHERE id = $1",
        tenant["id"],
        disabled,
    )
    return True


UNDECLARED_POLICIES = ("keep", "reject")


async def set_tenant_undeclared(conn: Conn, name: str, policy: str) -> bool:
    """Keep or reject a tenant's undeclared extension attributes from the next request on;
    False if it already did. Attributes already kept stay in the events and the views."""
    if policy not in UNDECLARED_POLICIES:
        raise ValueError(f"undeclared must be one of {', '.join(UNDECLARED_POLICIES)}")
    tenant = await conn.fetchrow("SELECT id, undeclared FROM tenants WHERE name = $1", name)
    if tenant is None:
        raise UnknownTenant(name)
    if tenant["undeclared"] == policy:
        return False
    await conn.execute("UPDATE tenants SET undeclared = $2 WHERE id = $1", tenant["id"], policy)
    return True


async def list_tenants(conn: Conn) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT t.name, t.id, t.created_at, t.disabled_at, t.undeclared,"
        " coalesce(a.users, 0) AS users, coalesce(a.groups, 0) AS groups,"
        " coalesce(a.events, 0) AS events, a.last_event_at,"
        " (SELECT count(*) FROM tokens k"
        "  WHERE k.tenant_id = t.id AND k.revoked_at IS NULL) AS tokens"
        " FROM tenants t LEFT JOIN tenant_activity a ON a.tenant_id = t.id"
        " ORDER BY t.created_at, t.name"
    )


async def list_tokens(conn: Conn, tenant: str) -> list[asyncpg.Record]:
    tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    if tenant_id is None:
        raise UnknownTenant(tenant)
    return list(
        await conn.fetch(
            "SELECT id, name, role, created_at, last_used_at, expires_at, revoked_at"
            " FROM tokens WHERE tenant_id = $1 ORDER BY created_at, name",
            tenant_id,
        )
    )


async def revoke_token(conn: Conn, token_id: uuid.UUID) -> bool:
    """Revoke at once: authentication reads the tokens table on every request."""
    done = await conn.execute(
        "UPDATE tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", token_id
    )
    return bool(done.endswith(" 1"))


async def issue_feed_token(conn: Conn, tenant_id: uuid.UUID, tenant: str, name: str) -> IssuedToken:
    """A poll stream's own token (role `feed`): it may poll that stream and nothing else."""
    return await _issue(conn, tenant_id, tenant, "feed", name)
