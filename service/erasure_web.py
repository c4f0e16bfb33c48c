"""The provisioning-log page's erasures (issue 17): the list, and each receipt with its check.

Kept apart from service/audit_web.py, whose page helpers (sign-in, layout, escaping) it uses.
"""

from __future__ import annotations

from uuid import UUID

from aiohttp import web

from infra.tenants import Principal
from service import erasure
from service.state import DATABASE


async def erasures_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    from service.audit_web import _html, e_

    async with request.app[DATABASE].pool.acquire() as conn:
        found = await erasure.receipts(conn, principal.tenant_id, 500)
    rows = "".join(
        "<tr>"
        f"<td>{e_(r.erased_at.strftime('%Y-%m-%d %H:%M:%S'))} UTC</td>"
        f"<td>{e_(r.subject_type)} <code>{e_(r.subject_id)}</code></td>"
        f"<td>{e_(r.requested_by)}</td><td>{e_(r.reason or '')}</td>"
        f"<td>{r.events}</td><td>{r.rows_deleted}</td><td>{r.audit_entries}</td>"
        f'<td><a href="/audit/erasures/{e_(r.id)}">Receipt</a></td></tr>'
        for r in found
    )
    table = (
        '<table class="log"><thead><tr><th>When</th><th>Subject</th><th>Asked by</th>'
        "<th>Reason</th><th>Events made unreadable</th><th>Rows deleted</th>"
        "<th>Log entries erased</th><th></th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        if found
        else '<p class="notice">No erasure in this tenant.</p>'
    )
    back = '<p class="back"><a href="/audit/">← Back to the log</a></p>'
    return _html("Erasures", f"{back}<h1>Erasures</h1>{table}", principal)


async def receipt_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    from service.audit_web import _html, e_

    back = '<p class="back"><a href="/audit/erasures">← Back to the erasures</a></p>'
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
        body = back + '<h1>Not found</h1><p class="notice error">No erasure with this id.</p>'
        return _html("Erasure not found", body, principal, status=404)
    _, problems = await erasure.verify(db, wanted)
    fields = "".join(
        f"<tr><th>{e_(k)}</th><td>{e_(v)}</td></tr>" for k, v in found.as_json().items()
    )
    if problems:
        check = (
            '<p class="notice error" role="alert">Check failed: '
            + "; ".join(e_(p) for p in problems)
            + "</p>"
        )
    else:
        check = (
            '<p class="notice" id="verified">Verified now: no event of this subject can be'
            " decrypted, and no view or log entry holds its values.</p>"
        )
    body = f'{back}<h1>Erasure receipt</h1>{check}<table class="detail">{fields}</table>'
    return _html("Erasure receipt", body, principal)


def add_routes(app: web.Application) -> None:
    from service.audit_web import _signed_in

    app.router.add_get("/audit/erasures", _signed_in(erasures_page))
    app.router.add_get("/audit/erasures/{id}", _signed_in(receipt_page))
