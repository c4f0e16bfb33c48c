"""The provisioning-log page's erasures (issue 17): the list, and each receipt with its check.

Kept apart from service/audit_web.py, whose page helpers (sign-in, rendering) it uses; the
pages are templates/audit/erasures.html and receipt.html.
"""

from __future__ import annotations

from uuid import UUID

from aiohttp import web

from infra.tenants import Principal
from service import erasure
from service.state import DATABASE


async def erasures_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    from service.audit_web import _render

    async with request.app[DATABASE].pool.acquire() as conn:
        found = await erasure.receipts(conn, principal.tenant_id, 500)
    return _render(request, "erasures", "Erasures", principal, receipts=found)


async def receipt_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    from service.audit_web import _message, _render

    try:
        wanted = UUID(request.match_info["id"])
    except ValueError:
        wanted = None
    db = request.app[DATABASE]
    found = None
    if wanted is not None:
        async with db.pool.acquire() as conn:
            found = await erasure.receipt(conn, wanted, principal.tenant_id)
    if wanted is None or found is None:
        return _message(
            request,
            principal,
            "Erasure not found",
            "No erasure with this id.",
            status=404,
            heading="Not found",
            back="/audit/erasures",
            alert=False,
        )
    _, problems = await erasure.verify(db, wanted)
    return _render(
        request,
        "receipt",
        "Erasure receipt",
        principal,
        problems=problems,
        fields=found.as_json(),
    )


def add_routes(app: web.Application) -> None:
    from service.audit_web import _signed_in

    app.router.add_get("/audit/erasures", _signed_in(erasures_page))
    app.router.add_get("/audit/erasures/{id}", _signed_in(receipt_page))
