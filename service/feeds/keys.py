"""Per-tenant signing keys for SETs (JWS ES256, RFC 7515/7518) and the JWKS that publishes them.

Keys are made on first use, one current key per tenant. A rotated key is retired, not deleted:
it stays in the JWKS while any SET it signed waits for delivery, so a receiver can still check
what it is sent (`GET /.well-known/jwks.json`).
"""

from __future__ import annotations

import secrets
from typing import Any
from uuid import UUID

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from infra.eventstore import Conn
from service.feeds.sealing import is_sealed, seal, unseal
from service.feeds.signing import b64, compact

ALGORITHM = "ES256"
# RFC 8417 §2.3: explicit typing of SETs.
TYP = "secevent+jwt"


class SigningKey:
    """One tenant key: signs SETs as compact JWS (RFC 7515 §7.1) with ES256 (RFC 7518 §3.4).

    The signature is cryptography's (OpenSSL); the compact form around it is built here rather
    than by PyJWT's `jwt.encode`, which costs as much again as the signature itself (its JSON
    encoding and checks, per token): a catch-up signs hundreds of thousands of SETs. PyJWT
    publishes the keys (`public_jwk`) and verifies our tokens in the tests.
    """

    def __init__(self, kid: str, private_pem: str) -> None:
        self.kid = kid
        self.private_pem = private_pem
        self.key: Any = serialization.load_pem_private_key(private_pem.encode(), password=None)
        header = orjson.dumps({"alg": ALGORITHM, "kid": kid, "typ": TYP})
        self.header = b64(header) + b"."  # the encoded protected header and its dot

    def sign(self, claims: dict[str, Any]) -> str:
        return self.sign_json(orjson.dumps(claims))

    def sign_json(self, payload: bytes) -> str:
        """The compact JWS of a claims set already serialised (build.Signer's template)."""
        return compact(self.key, self.header, payload)


def _new_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


class KeyRing:
    """Signing keys loaded once per process, by kid; the current one is looked up per batch,
    so a rotation (`scimledger feeds rotate-key`) takes effect on every instance at once."""

    def __init__(self) -> None:
        self._loaded: dict[str, SigningKey] = {}

    async def current(self, conn: Conn, tenant_id: UUID, kid: str | None = None) -> SigningKey:
        """The tenant's current key; `kid` if the caller has just read it (else read here)."""
        if kid is None:
            kid = await conn.fetchval(
                "SELECT kid FROM feed_keys WHERE tenant_id = $1 AND retired_at IS NULL", tenant_id
            )
        key = self._loaded.get(kid) if kid else None
        if key is None:
            key = await current_key(conn, tenant_id)
            self._loaded[key.kid] = key
        return key


async def current_key(conn: Conn, tenant_id: UUID) -> SigningKey:
    row = await conn.fetchrow(
        "SELECT kid, private_pem FROM feed_keys WHERE tenant_id = $1 AND retired_at IS NULL",
        tenant_id,
    )
    if row is None:
        kid = secrets.token_urlsafe(12)
        await conn.execute(
            "INSERT INTO feed_keys (kid, tenant_id, private_pem) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING",
            kid,
            tenant_id,
            seal(kid, _new_pem()),  # at rest sealed (service/feeds/sealing.py)
        )
        row = await conn.fetchrow(
            "SELECT kid, private_pem FROM feed_keys WHERE tenant_id = $1 AND retired_at IS NULL",
            tenant_id,
        )
    assert row is not None
    pem = unseal(row["kid"], row["private_pem"])
    if not is_sealed(row["private_pem"]):  # stored before sealing: sealed now
        await conn.execute(
            "UPDATE feed_keys SET private_pem = $2 WHERE kid = $1 AND private_pem = $3",
            row["kid"],
            seal(row["kid"], pem),
            row["private_pem"],
        )
    return SigningKey(row["kid"], pem)


async def rotate(conn: Conn, tenant_id: UUID) -> str:
    """Retire the tenant's current key and make a new one; returns the new kid."""
    async with conn.transaction():
        await conn.execute(
            "UPDATE feed_keys SET retired_at = now() WHERE tenant_id = $1 AND retired_at IS NULL",
            tenant_id,
        )
        return (await current_key(conn, tenant_id)).kid


_PUBLIC: dict[str, dict[str, Any]] = {}  # kid -> JWK: a key never changes under its kid


def public_jwk(kid: str, stored: str) -> dict[str, Any]:
    """The public JWK of a stored (sealed or plain) private key."""
    cached = _PUBLIC.get(kid)
    if cached is not None:
        return cached
    key: Any = serialization.load_pem_private_key(unseal(kid, stored).encode(), password=None)
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    if len(_PUBLIC) >= 10_000:
        _PUBLIC.clear()
    _PUBLIC[kid] = {**jwk, "kid": kid, "use": "sig", "alg": ALGORITHM}
    return _PUBLIC[kid]


async def jwks(conn: Any, tenant_id: UUID | None = None) -> dict[str, Any]:
    """Every published key: current ones, and retired ones that signed a SET still pending."""
    rows = await conn.fetch(
        "SELECT k.kid, k.private_pem FROM feed_keys k"
        " WHERE ($1::uuid IS NULL OR k.tenant_id = $1)"
        "   AND (k.retired_at IS NULL OR EXISTS (SELECT 1 FROM feed_streams t"
        "     JOIN feed_sets s ON s.stream_id = t.id"
        "     WHERE t.tenant_id = k.tenant_id AND s.kid = k.kid))"
        " ORDER BY k.created_at",
        tenant_id,
    )
    return {"keys": [public_jwk(r["kid"], r["private_pem"]) for r in rows]}
