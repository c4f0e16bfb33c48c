"""The audit pages' sessions: sign-in takes an audit token once and opens a session.

A session is a random id in an HttpOnly, SameSite=Strict cookie scoped to /audit/; only its
SHA-256 digest is stored (`audit_sessions`). Every request checks the session and that its token
is still live, so revoking the token (or disabling the tenant) ends the session at once.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from urllib.parse import urlsplit

from aiohttp import web

from infra.tenants import LIVE_TOKEN, Principal, digest
from service.boundary import is_credential
from service.state import DATABASE, PRINCIPAL, SETTINGS

COOKIE = "scimledger_audit"
COOKIE_PATH = "/audit/"
SESSION_LIFETIME = timedelta(hours=8)

_SESSION_SQL = (
    "SELECT k.id, k.name, k.role, t.id AS tenant_id, t.name AS tenant_name"
    " FROM audit_sessions s JOIN tokens k ON k.id = s.token_id"
    " JOIN tenants t ON t.id = k.tenant_id"
    f" WHERE s.id_hash = $1 AND s.expires_at > now() AND k.role = 'audit' AND {LIVE_TOKEN}"
)


async def open_session(request: web.Request, principal: Principal) -> str:
    """A new session for `principal`; returns the id the cookie carries."""
    session_id = secrets.token_urlsafe(32)
    async with request.app[DATABASE].pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM audit_sessions WHERE expires_at <= now()")
        await conn.execute(
            "INSERT INTO audit_sessions (id_hash, token_id, expires_at)"
            " VALUES ($1, $2, now() + $3::interval)",
            digest(session_id),
            principal.token_id,
            SESSION_LIFETIME,
        )
    return session_id


async def session(request: web.Request) -> Principal | None:
    """The principal of the request's session, if it is open and its token still live."""
    session_id = request.cookies.get(COOKIE, "")
    if not session_id or len(session_id) > 128 or not is_credential(session_id):
        return None
    row = await request.app[DATABASE].pool.fetchrow(_SESSION_SQL, digest(session_id))
    if row is None:
        return None
    principal = Principal(row["tenant_id"], row["tenant_name"], row["id"], row["name"], row["role"])
    request[PRINCIPAL] = principal  # for the access log
    return principal


async def close_session(request: web.Request) -> None:
    session_id = request.cookies.get(COOKIE, "")
    if session_id:
        await request.app[DATABASE].pool.execute(
            "DELETE FROM audit_sessions WHERE id_hash = $1", digest(session_id)
        )


def set_cookie(request: web.Request, response: web.StreamResponse, session_id: str) -> None:
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=int(SESSION_LIFETIME.total_seconds()),
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
    )


def delete_cookie(request: web.Request, response: web.StreamResponse) -> None:
    response.del_cookie(
        COOKIE, path=COOKIE_PATH, secure=_secure(request), httponly=True, samesite="Strict"
    )


def same_origin(request: web.Request) -> bool:
    """A cross-site form post is refused (on top of SameSite=Strict). `Origin: null` (a
    sandboxed frame, a data: or file: page, a cross-origin redirect) is no origin of ours.
    Behind a proxy the page's origin is that of SCIMLEDGER_PUBLIC_URL."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    ours = {request.host}
    public = request.app[SETTINGS].public_url
    if public:
        ours.add(urlsplit(public).netloc)
    try:
        return origin != "null" and urlsplit(origin).netloc in ours
    except ValueError:  # e.g. "http://[": not a URL, so not ours
        return False


def _secure(request: web.Request) -> bool:
    """Whether the session cookie is Secure: the request came over HTTPS, or the service is
    published at an https SCIMLEDGER_PUBLIC_URL (a TLS-terminating load balancer forwards
    plain HTTP, so the request alone never says so)."""
    public = request.app[SETTINGS].public_url or ""
    return request.secure or public.lower().startswith("https://")


def local(target: str) -> str:
    """Where to go after signing in: a page of ours, never another site."""
    if "\\" in target or not target.isprintable():  # a control character cannot go in Location
        return COOKIE_PATH
    try:
        parts = urlsplit(target)
    except ValueError:
        return COOKIE_PATH
    if parts.scheme or parts.netloc or not parts.path.startswith(COOKIE_PATH):
        return COOKIE_PATH
    if parts.path.startswith("/audit/sign-"):
        return COOKIE_PATH
    return target
