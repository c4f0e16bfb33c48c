"""`/audit/v1/erasures`: erasure for compliance tooling, with an audit token of the tenant.

POST {"userId": ID} or {"groupId": ID}, with "reason" and "force" optional, answers 201 and the
receipt; GET lists the tenant's receipts; GET /audit/v1/erasures/{id} one, with its check.
Another tenant's token neither sees nor performs one (its subjects are not found).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import orjson
from aiohttp import web

from service import erasure
from service.errors import ScimError
from service.state import DATABASE, PRINCIPAL

MAX_BODY = 16 * 1024


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _id(raw: Any, what: str) -> UUID:
    try:
        return UUID(str(raw))
    except ValueError:
        raise ScimError(400, f"{what} must be an id", "invalidValue") from None


async def create(request: web.Request) -> web.Response:
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ScimError(413, f"the body is larger than {MAX_BODY} bytes")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ScimError(400, "the body is not valid JSON", "invalidSyntax") from None
    if not isinstance(body, dict):
        raise ScimError(400, "the body must be a JSON object", "invalidSyntax")
    user, group = body.get("userId"), body.get("groupId")
    if (user is None) == (group is None):
        raise ScimError(400, "name one of userId or groupId", "invalidValue")
    reason, force = body.get("reason"), body.get("force", False)
    if reason is not None and not isinstance(reason, str):
        raise ScimError(400, "reason must be a string", "invalidValue")
    if not isinstance(force, bool):
        raise ScimError(400, "force must be a boolean", "invalidValue")
    kind = "User" if user is not None else "Group"
    subject = _id(user if user is not None else group, "userId" if user is not None else "groupId")
    principal = request[PRINCIPAL]
    try:
        receipt = await erasure.erase(
            request.app[DATABASE],
            principal.tenant_id,
            subject,
            kind,
            f"audit token {principal.token_name}",
            reason,
            force=force,
        )
    except erasure.ErasureError as e:
        raise ScimError(e.status, str(e), e.scim_type) from None
    return _json(receipt.as_json(), 201)


async def listing(request: web.Request) -> web.Response:
    async with request.app[DATABASE].pool.acquire() as conn:
        found = await erasure.receipts(conn, request[PRINCIPAL].tenant_id)
    return _json({"erasures": [r.as_json() for r in found]})


async def one(request: web.Request) -> web.Response:
    try:
        wanted = UUID(request.match_info["id"])
    except ValueError:
        raise ScimError(404, f"erasure {request.match_info['id']} not found") from None
    db = request.app[DATABASE]
    async with db.pool.acquire() as conn:
        found = await erasure.receipt(conn, wanted, request[PRINCIPAL].tenant_id)
    if found is None:
        raise ScimError(404, f"erasure {wanted} not found")
    _, problems = await erasure.verify(db, wanted)
    return _json({**found.as_json(), "verified": not problems, "problems": problems})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/audit/v1/erasures", create)
    app.router.add_get("/audit/v1/erasures", listing)
    app.router.add_get("/audit/v1/erasures/{id}", one)
