"""`/audit/`: the provisioning log as web pages for compliance officers (Entra's portal, our side).

Server-rendered HTML from Jinja2 templates (service/templates/audit/, autoescaped; through
aiohttp-jinja2): plain forms and links, no script needed (one small optional one,
service/static/audit/audit.js, fills in "custom" when a date is typed, and joins an export's
pages into one file; without it an export link saves its first page). Sessions are in
service/audit_sessions.py. The JSON API under /audit/v1/ is separate and keeps bearer tokens.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import aiohttp_jinja2
import jinja2
from aiohttp import web
from markupsafe import Markup
from yarl import URL

from infra.tenants import Principal, authenticate
from service import audit_api
from service import audit_queries as q
from service import audit_sessions as sessions
from service.audit_filters import PAGE_SIZE, RANGES, Filters, local_input
from service.audit_sessions import COOKIE_PATH
from service.state import DATABASE, SETTINGS, Handler
from service.streams import REQUEST_SLOTS

# Entra's "Troubleshooting & recommendations", for the error codes the audit projection gives.
RECOMMENDATIONS = {
    "EntryConflict": (
        "Another user or group already holds this unique value (userName, externalId or"
        " displayName), or the client wrote from a stale copy (If-Match). Look for a duplicate"
        " in the source directory, or match the existing object instead of creating a new one."
    ),
    "InvalidAnchor": (
        "The resource does not exist here: it was deleted, or never provisioned. The identity"
        " provider creates it again on its next cycle if it is still in scope."
    ),
    "Unauthorized": (
        "The token was refused or may not do this. Check the secret token configured in the"
        " identity provider and that it has not been revoked or expired."
    ),
    "MandatoryFieldsMissing": (
        "A required attribute was missing. Check the attribute mappings in the identity provider."
    ),
    "InvalidInput": (
        "The request did not follow the SCIM schema. Check the attribute mappings and the value"
        " named in the reason."
    ),
    "TooManyRequests": "The client sent too much at once; it retries on its own.",
    "InternalServerError": (
        "The service failed. The change id is the request id: it finds the request in the"
        " service's logs."
    ),
    "ServiceUnavailable": "The database was unavailable; the client retries on its own.",
}


Page = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]


# --- the filter form -------------------------------------------------------------------------


# --- templates -------------------------------------------------------------------------------

_HERE = Path(__file__).parent
STATIC = _HERE / "static" / "audit"


def _escaped(value: Any) -> Any:
    """Everything a template prints from data: None is nothing, the rest escaped with the
    standard library's entities (autoescaping then leaves the Markup alone)."""
    if value is None:
        return ""
    if hasattr(value, "__html__"):
        return value
    return Markup(escape(str(value), quote=True))


def _utc(iso: str) -> str:
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC)
    return f"{moment:%Y-%m-%d %H:%M:%S}"


def _duration(entry: Mapping[str, Any]) -> str:
    ms = entry.get("durationInMilliseconds")
    return "an unknown time" if ms is None else f"{float(ms):.1f} ms"


def _entry_url(entry: Mapping[str, Any], filters: Filters | None = None) -> str | None:
    try:
        entry_id = UUID(str(entry["id"]))
    except ValueError:
        return None  # an entry without a request id of its own has no page
    query = filters.query() if filters else ""
    return f"/audit/entries/{entry_id}" + (f"?{query}" if query else "")


TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_HERE / "templates"),
    autoescape=True,
    finalize=_escaped,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)
TEMPLATES.filters.update(
    utc=_utc, duration=_duration, entry_url=_entry_url, local_input=local_input
)


def _lag_notice(lag: Mapping[str, Any]) -> str:
    """The notice that the log is behind the event store ('' when it is not)."""
    macros = TEMPLATES.get_template("audit/macros.html").module
    return str(macros.lag_notice(lag))  # type: ignore[attr-defined]


_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        # connect-src: audit.js fetches an export's pages (and nothing else) to join them.
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self';"
        " connect-src 'self';"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: under it browsers send `Origin: null` with our own form posts, and null
    # is refused at sign-in (sessions.same_origin). Other sites still get no referrer.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _render(
    request: web.Request,
    template: str,
    title: str,
    principal: Principal | None = None,
    status: int = 200,
    **context: Any,
) -> web.Response:
    response = aiohttp_jinja2.render_template(
        f"audit/{template}.html",
        request,
        {"title": title, "principal": principal, **context},
        status=status,
    )
    response.headers.update(_SECURITY_HEADERS)
    return response


def _message(
    request: web.Request,
    principal: Principal,
    title: str,
    message: str,
    *,
    status: int,
    heading: str | None = None,
    back: str | None = None,
    alert: bool = True,
) -> web.Response:
    return _render(
        request,
        "message",
        title,
        principal,
        status,
        heading=heading or title,
        message=message,
        back=back,
        alert=alert,
    )


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _sign_in_page(
    request: web.Request, after: str, error: str | None = None, status: int = 200
) -> web.Response:
    signed_out = not error and after.startswith(COOKIE_PATH + "?signed-out")
    if signed_out:
        after = COOKIE_PATH
    return _render(
        request,
        "sign_in",
        "Sign in",
        status=status,
        error=error,
        signed_out=signed_out,
        after=sessions.local(after),
    )


# --- sign-in and out -----------------------------------------------------------------------------


def _signed_in(page: Page, *, landing: bool = False) -> Handler:
    """Run `page` for a signed-in officer; anyone else gets the sign-in form."""

    async def handler(request: web.Request) -> web.StreamResponse:
        principal = await sessions.session(request)
        if principal is None:
            return _sign_in_page(request, request.path_qs, status=200 if landing else 401)
        with request.app[REQUEST_SLOTS].hold(principal.token_id):
            return await page(request, principal)

    return handler


async def sign_in(request: web.Request) -> web.StreamResponse:
    if not sessions.same_origin(request):
        error = "Sign-in from another site is refused."
        return _sign_in_page(request, COOKIE_PATH, error=error, status=403)
    form = await request.post()
    token = str(form.get("token", "")).strip()
    after = sessions.local(str(form.get("next", COOKIE_PATH)))
    principal = await authenticate(request.app[DATABASE].pool, token) if token else None
    if principal is None:
        error = "This token is not valid: it is unknown, revoked or expired."
        return _sign_in_page(request, after, error=error, status=401)
    if principal.role != "audit":
        error = (
            f"This is a {principal.role} token: it may push users and groups, not read the"
            " provisioning log. Sign in with an audit token."
        )
        return _sign_in_page(request, after, error=error, status=403)
    session_id = await sessions.open_session(request, principal)
    response = _redirect(after)
    sessions.set_cookie(request, response, session_id)
    return response


async def sign_out(request: web.Request) -> web.StreamResponse:
    """POST only (a GET is 405): a link or an image on another page must not end a session."""
    if not sessions.same_origin(request):
        error = "Sign-out from another site is refused."
        return _sign_in_page(request, COOKIE_PATH, error=error, status=403)
    await sessions.close_session(request)
    response = _redirect(COOKIE_PATH + "?signed-out=1")
    sessions.delete_cookie(request, response)
    return response


# --- pages -------------------------------------------------------------------------------------


async def log_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    filters = Filters.from_query(request.query)
    pool = request.app[DATABASE].pool
    entries: list[dict[str, Any]] = []
    next_token: str | None = None
    error: str | None = None
    try:
        where = filters.audit_filter(datetime.now(UTC))
        entries, next_token = await q.page(
            pool, principal.tenant_id, where, filters.limit, filters.next_token
        )
    except q.BadQuery as e:
        error = str(e)
    lag = await q.lag(pool, principal.tenant_id)
    range_label = RANGES[filters.values["range"]][0]
    if filters.values["range"] == "custom":
        since, until = filters.values["from"], filters.values["to"]
        range_label = f"From {since or 'the beginning'} to {until or 'now'} (UTC)"
    return _render(
        request,
        "log",
        "Provisioning log",
        principal,
        400 if error else 200,
        lag=lag,
        filters=filters,
        page_size=PAGE_SIZE,
        export_cap=request.app[SETTINGS].max_export_entries,
        ranges=[(key, label) for key, (label, _) in RANGES.items()],
        actions=[("", "All"), *((a, a.capitalize()) for a in q.ACTIONS)],
        statuses=[("", "All"), *((s, s.capitalize()) for s in q.STATUSES)],
        error=error,
        entries=entries,
        range_label=range_label,
        first_url=_list_url(filters) if filters.next_token else None,
        next_url="/audit/?" + filters.query(next=next_token) if next_token else None,
    )


async def entry_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    filters = Filters.from_query(request.query)
    back = _list_url(filters)
    found = await q.one(request.app[DATABASE].pool, principal.tenant_id, request.match_info["id"])
    if found is None:
        return _message(
            request, principal, "Entry not found", "No entry with this id.",
            status=404, back=back, alert=False,
        )  # fmt: skip
    change_url = "/audit/?" + urlencode({"range": "all", "changeId": found["changeId"] or ""})
    return _render(
        request,
        "entry",
        "Log entry",
        principal,
        entry=found,
        back=back,
        change_url=change_url,
        recommendations=RECOMMENDATIONS,
    )


async def resource_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    try:
        resource_id = UUID(request.match_info["id"])
    except ValueError:
        resource_id = None
    page = Filters.from_query(request.query)  # its limit and next token
    found: list[dict[str, Any]] = []
    next_token: str | None = None
    if resource_id is not None:
        try:
            found, next_token = await q.history(
                request.app[DATABASE].pool,
                principal.tenant_id,
                resource_id,
                page.limit,
                page.next_token,
            )
        except q.BadQuery as e:
            return _message(request, principal, "History", str(e), status=400, back="/audit/")
    if not found:
        return _message(
            request, principal, "No history",
            "The provisioning log has no entry for this resource.",
            status=404, back="/audit/", alert=False,
        )  # fmt: skip
    base = f"/audit/resources/{resource_id}"
    limit = {"limit": str(page.limit)} if page.limit != PAGE_SIZE else {}
    names = [e["targetIdentity"]["displayName"] for e in found]
    return _render(
        request,
        "history",
        "Resource history",
        principal,
        resource_id=str(resource_id),
        entries=found,
        latest=found[-1]["targetIdentity"],
        name=next((n for n in reversed(names) if n), None),
        first_url=(base + (f"?{urlencode(limit)}" if limit else "")) if page.next_token else None,
        next_url=f"{base}?{urlencode({**limit, 'next': next_token})}" if next_token else None,
    )


async def export_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    fmt = request.query.get("format", "csv")
    filters = Filters.from_query(request.query)
    now = datetime.now(UTC)
    try:
        if fmt not in ("csv", "jsonl"):
            raise q.BadQuery("The export format must be csv or jsonl.")
        where = filters.audit_filter(now)
        page = await audit_api.export_page_of(request, principal.tenant_id, where)
    except q.BadQuery as e:
        return _message(request, principal, "Export", str(e), status=400)
    name = f"provisioning-log-{now:%Y%m%dT%H%M%SZ}"
    next_url = None
    if page.next_token:
        # The rest of this export, from the same moment ("last 7 days" as of the first page).
        pinned = filters.pinned(where)
        next_url = URL(f"/audit/export?{pinned.query(format=fmt, next=page.next_token)}")
    return await audit_api.write_export(
        request, principal.tenant_id, where, page, fmt, next_url, name
    )


def _list_url(filters: Filters) -> str:
    query = filters.query()
    return "/audit/" + (f"?{query}" if query else "")


async def redirect_to_log(request: web.Request) -> web.StreamResponse:
    return _redirect(COOKIE_PATH)


def _asset(name: str, content_type: str) -> Handler:
    """One of the pages' static files (only these: no directory is served)."""
    path = STATIC / name
    headers = {"Content-Type": content_type, "Cache-Control": "max-age=3600"}

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path, headers=headers)

    return handler


def add_routes(app: web.Application) -> None:
    app[aiohttp_jinja2.APP_KEY] = TEMPLATES
    app.router.add_get("/audit", redirect_to_log)
    app.router.add_get("/audit/", _signed_in(log_page, landing=True))
    app.router.add_post("/audit/sign-in", sign_in)
    app.router.add_get("/audit/sign-in", redirect_to_log)
    app.router.add_post("/audit/sign-out", sign_out)
    app.router.add_get("/audit/entries/{id}", _signed_in(entry_page))
    app.router.add_get("/audit/resources/{id}", _signed_in(resource_page))
    app.router.add_get("/audit/export", _signed_in(export_page))
    app.router.add_get("/audit/assets/audit.css", _asset("audit.css", "text/css"))
    app.router.add_get("/audit/assets/audit.js", _asset("audit.js", "text/javascript"))
    from service import erasure_web  # issue 17: erasures and receipts, kept apart

    erasure_web.add_routes(app)
