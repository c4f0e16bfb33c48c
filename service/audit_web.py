"""`/audit/`: the provisioning log as web pages for compliance officers (Entra's portal, our side).

Server-rendered HTML: plain forms and links, everything from data escaped, no script needed (one
small optional one fills in "custom" when a date is typed). Sign-in takes an audit token once
and opens a session: a random id in an HttpOnly, SameSite=Strict cookie scoped to /audit/, only
its SHA-256 digest in `audit_sessions`. Every request checks the session and that its token is
still live, so revoking the token (or disabling the tenant) ends the session at once.
The JSON API under /audit/v1/ is separate and keeps bearer tokens.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html import escape
from typing import Any
from urllib.parse import urlencode, urlsplit
from uuid import UUID

from aiohttp import web

from infra.tenants import LIVE_TOKEN, Principal, authenticate, digest
from service import audit_api
from service import audit_queries as q
from service.boundary import in_utc, is_credential
from service.state import DATABASE, PRINCIPAL, SETTINGS, Handler
from service.streams import REQUEST_SLOTS

COOKIE = "scimledger_audit"
COOKIE_PATH = "/audit/"
SESSION_LIFETIME = timedelta(hours=8)
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

RANGES: dict[str, tuple[str, timedelta | None]] = {
    "24h": ("Last 24 hours", timedelta(hours=24)),
    "7d": ("Last 7 days", timedelta(days=7)),
    "30d": ("Last 30 days", timedelta(days=30)),
    "all": ("All time", None),
    "custom": ("Custom range (From, To)", None),
}
DEFAULT_RANGE = "7d"
# The query parameters of the list page that links (detail, next page, export) carry along.
FILTER_KEYS = (
    "range",
    "from",
    "to",
    "action",
    "status",
    "identity",
    "changeId",
    "clientRequestId",
    "errorCode",
)

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

_SESSION_SQL = (
    "SELECT k.id, k.name, k.role, t.id AS tenant_id, t.name AS tenant_name"
    " FROM audit_sessions s JOIN tokens k ON k.id = s.token_id"
    " JOIN tenants t ON t.id = k.tenant_id"
    f" WHERE s.id_hash = $1 AND s.expires_at > now() AND k.role = 'audit' AND {LIVE_TOKEN}"
)

Page = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]


# --- sessions -------------------------------------------------------------------------------


async def _open_session(request: web.Request, principal: Principal) -> str:
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


async def _session(request: web.Request) -> Principal | None:
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


def _signed_in(page: Page, *, landing: bool = False) -> Handler:
    """Run `page` for a signed-in officer; anyone else gets the sign-in form."""

    async def handler(request: web.Request) -> web.StreamResponse:
        principal = await _session(request)
        if principal is None:
            return _sign_in_page(request.path_qs, status=200 if landing else 401)
        with request.app[REQUEST_SLOTS].hold(principal.token_id):
            return await page(request, principal)

    return handler


def _same_origin(request: web.Request) -> bool:
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


def _local(target: str) -> str:
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


async def sign_in(request: web.Request) -> web.StreamResponse:
    if not _same_origin(request):
        return _sign_in_page(COOKIE_PATH, error="Sign-in from another site is refused.", status=403)
    form = await request.post()
    token = str(form.get("token", "")).strip()
    after = _local(str(form.get("next", COOKIE_PATH)))
    principal = await authenticate(request.app[DATABASE].pool, token) if token else None
    if principal is None:
        return _sign_in_page(
            after,
            error="This token is not valid: it is unknown, revoked or expired.",
            status=401,
        )
    if principal.role != "audit":
        return _sign_in_page(
            after,
            error=(
                f"This is a {principal.role} token: it may push users and groups, not read the"
                " provisioning log. Sign in with an audit token."
            ),
            status=403,
        )
    session_id = await _open_session(request, principal)
    response = _redirect(after)
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=int(SESSION_LIFETIME.total_seconds()),
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
    )
    return response


async def sign_out(request: web.Request) -> web.StreamResponse:
    """POST only (a GET is 405): a link or an image on another page must not end a session."""
    if not _same_origin(request):
        return _sign_in_page(
            COOKIE_PATH, error="Sign-out from another site is refused.", status=403
        )
    session_id = request.cookies.get(COOKIE, "")
    if session_id:
        await request.app[DATABASE].pool.execute(
            "DELETE FROM audit_sessions WHERE id_hash = $1", digest(session_id)
        )
    response = _redirect(COOKIE_PATH + "?signed-out=1")
    response.del_cookie(
        COOKIE, path=COOKIE_PATH, secure=_secure(request), httponly=True, samesite="Strict"
    )
    return response


# --- the filter form -------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """What the officer asked for, as the form shows it."""

    values: Mapping[str, str]
    limit: int
    next_token: str | None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Filters:
        values = {k: query.get(k, "").strip() for k in FILTER_KEYS}
        if values["range"] not in RANGES:
            values["range"] = "custom" if values["from"] or values["to"] else DEFAULT_RANGE
        try:
            limit = max(1, min(int(query.get("limit", PAGE_SIZE)), MAX_PAGE_SIZE))
        except ValueError:
            limit = PAGE_SIZE
        return cls(values, limit, query.get("next") or None)

    def audit_filter(self, now: datetime) -> q.AuditFilter:
        """The query's filter; raises q.BadQuery with a message for the officer."""
        v = self.values
        params: dict[str, str] = {
            "action": v["action"],
            "status": v["status"],
            "changeId": v["changeId"],
            "clientRequestId": v["clientRequestId"],
            "errorCode": v["errorCode"],
        }
        # Identity is a name or an id, as in Entra's portal.
        identity = v["identity"]
        try:
            params["target"] = str(UUID(identity))
        except ValueError:
            params["identity"] = identity
        span = RANGES[v["range"]][1]
        if span is not None:
            params["from"] = (now - span).isoformat()
        elif v["range"] == "custom":
            since, until = _moment(v["from"], "From"), _moment(v["to"], "To")
            if since and until and until <= since:
                raise q.BadQuery("To must be after From.")
            params["from"] = since.isoformat() if since else ""
            params["to"] = until.isoformat() if until else ""
        return q.AuditFilter.parse(params)

    def query(self, **extra: str | None) -> str:
        """The filters (and `extra`) as a query string, empty values left out."""
        pairs = [(k, v) for k, v in self.values.items() if v]
        if self.limit != PAGE_SIZE:
            pairs.append(("limit", str(self.limit)))
        pairs += [(k, v) for k, v in extra.items() if v]
        return urlencode(pairs)


def _moment(raw: str, label: str) -> datetime | None:
    """A date-time from the form (datetime-local gives no zone: it is UTC, as the page says)."""
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise q.BadQuery(f"{label} must be a date and time, like 2025-01-31T09:00.") from None
    if in_utc(moment) is None:
        raise q.BadQuery(f"{label} is out of range: years 1 to 9999 in UTC.")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _local_input(raw: str) -> str:
    """A custom date as a datetime-local input shows it (UTC), or '' if it is not one."""
    try:
        moment = _moment(raw, "")
    except q.BadQuery:
        return ""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") if moment else ""


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
    parts = [
        "<h1>Provisioning log</h1>",
        _lag_notice(lag),
        _filter_form(filters),
    ]
    if error:
        parts.append(f'<p class="notice error" role="alert">{e_(error)}</p>')
    else:
        parts.append(_toolbar(filters, len(entries)))
        parts.append(_log_table(entries, filters))
        parts.append(_pager(filters, next_token))
    return _html("Provisioning log", "".join(parts), principal, status=400 if error else 200)


async def entry_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    filters = Filters.from_query(request.query)
    back = f'<p class="back"><a href="{e_(_list_url(filters))}">← Back to the log</a></p>'
    found = await q.one(request.app[DATABASE].pool, principal.tenant_id, request.match_info["id"])
    if found is None:
        body = back + '<h1>Entry not found</h1><p class="notice error">No entry with this id.</p>'
        return _html("Entry not found", body, principal, status=404)
    return _html("Log entry", back + _entry_detail(found, filters), principal)


async def resource_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    back = '<p class="back"><a href="/audit/">← Back to the log</a></p>'
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
            body = f'{back}<h1>History</h1><p class="notice error" role="alert">{e_(e)}</p>'
            return _html("History", body, principal, status=400)
    if not found:
        body = (
            back + "<h1>No history</h1>"
            '<p class="notice error">The provisioning log has no entry for this resource.</p>'
        )
        return _html("No history", body, principal, status=404)
    history = _history(str(resource_id), found) + _history_pager(str(resource_id), page, next_token)
    return _html("Resource history", back + history, principal)


async def export_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    fmt = request.query.get("format", "csv")
    filters = Filters.from_query(request.query)
    now = datetime.now(UTC)
    try:
        if fmt not in ("csv", "jsonl"):
            raise q.BadQuery("The export format must be csv or jsonl.")
        where = filters.audit_filter(now)
    except q.BadQuery as e:
        body = f'<h1>Export</h1><p class="notice error" role="alert">{e_(e)}</p>'
        return _html("Export", body, principal, status=400)
    name = f"provisioning-log-{now:%Y%m%dT%H%M%SZ}"
    return await audit_api.write_export(request, principal.tenant_id, where, fmt, name)


async def redirect_to_log(request: web.Request) -> web.StreamResponse:
    return _redirect(COOKIE_PATH)


async def stylesheet(request: web.Request) -> web.StreamResponse:
    return web.Response(
        text=CSS, content_type="text/css", headers={"Cache-Control": "max-age=3600"}
    )


async def script(request: web.Request) -> web.StreamResponse:
    return web.Response(
        text=JS, content_type="text/javascript", headers={"Cache-Control": "max-age=3600"}
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/audit", redirect_to_log)
    app.router.add_get("/audit/", _signed_in(log_page, landing=True))
    app.router.add_post("/audit/sign-in", sign_in)
    app.router.add_get("/audit/sign-in", redirect_to_log)
    app.router.add_post("/audit/sign-out", sign_out)
    app.router.add_get("/audit/entries/{id}", _signed_in(entry_page))
    app.router.add_get("/audit/resources/{id}", _signed_in(resource_page))
    app.router.add_get("/audit/export", _signed_in(export_page))
    app.router.add_get("/audit/assets/audit.css", stylesheet)
    app.router.add_get("/audit/assets/audit.js", script)
    from service import erasure_web  # issue 17: erasures and receipts, kept apart

    erasure_web.add_routes(app)


# --- HTML ------------------------------------------------------------------------------------


def e_(value: Any) -> str:
    """Text from data, safe in element content and quoted attributes."""
    return "" if value is None else escape(str(value), quote=True)


_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self';"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: under it browsers send `Origin: null` with our own form posts, and null
    # is refused at sign-in (_same_origin). Other sites still get no referrer.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _html(
    title: str, body: str, principal: Principal | None = None, status: int = 200
) -> web.Response:
    who = ""
    if principal is not None:
        who = (
            f'<span class="who">Tenant <strong>{e_(principal.tenant_name)}</strong>'
            f" · token {e_(principal.token_name)}</span>"
            '<form method="post" action="/audit/sign-out">'
            '<button type="submit" class="secondary">Sign out</button></form>'
        )
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e_(title)} · scimledger</title>"
        '<link rel="stylesheet" href="/audit/assets/audit.css">'
        '<script src="/audit/assets/audit.js" defer></script></head><body>'
        f'<header class="top"><a href="/audit/">scimledger · Provisioning log</a>{who}</header>'
        f"<main>{body}</main></body></html>"
    )
    return web.Response(
        text=page, status=status, content_type="text/html", headers=_SECURITY_HEADERS
    )


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _sign_in_page(after: str, error: str | None = None, status: int = 200) -> web.Response:
    message = f'<p class="notice error" role="alert">{e_(error)}</p>' if error else ""
    if not error and after.startswith(COOKIE_PATH + "?signed-out"):
        message = '<p class="notice info" role="status">You have signed out.</p>'
        after = COOKIE_PATH
    body = (
        '<section class="sign-in"><h1>Sign in to the provisioning log</h1>'
        "<p>Use an <strong>audit token</strong> of your tenant (an operator issues one with"
        " <code>scimledger tokens create --tenant NAME --role audit</code>). The session lasts"
        " 8 hours, and ends at once if the token is revoked.</p>"
        f"{message}"
        '<form method="post" action="/audit/sign-in" class="sign-in">'
        f'<input type="hidden" name="next" value="{e_(_local(after))}">'
        '<label for="token">Audit token</label>'
        '<input type="password" id="token" name="token" autocomplete="off" required'
        ' spellcheck="false">'
        '<button type="submit">Sign in</button></form></section>'
    )
    return _html("Sign in", body, status=status)


def _lag_notice(lag: Mapping[str, Any]) -> str:
    behind = lag.get("eventsBehind")
    if behind is None:
        return (
            '<p class="notice warn" role="status">The provisioning log has not started yet:'
            " entries appear once its projection runs.</p>"
        )
    if behind == 0:
        return ""
    plural = "event" if behind == 1 else "events"
    if lag.get("eventsBehindCapped"):
        behind, plural = f"{behind:,}+", "events"
    return (
        f'<p class="notice warn lag" role="status">The log is {behind} {plural} behind the'
        " event store: the newest changes may not be shown yet. Reload in a moment.</p>"
    )


def _options(choices: Iterable[tuple[str, str]], selected: str) -> str:
    return "".join(
        f'<option value="{e_(value)}"{" selected" if value == selected else ""}>{e_(label)}'
        "</option>"
        for value, label in choices
    )


def _filter_form(filters: Filters) -> str:
    v = filters.values
    ranges = [(key, label) for key, (label, _) in RANGES.items()]
    actions = [("", "All"), *((a, a.capitalize()) for a in q.ACTIONS)]
    statuses = [("", "All"), *((s, s.capitalize()) for s in q.STATUSES)]
    custom = v["range"] == "custom"
    limit = (
        f'<input type="hidden" name="limit" value="{filters.limit}">'
        if filters.limit != PAGE_SIZE
        else ""
    )
    return (
        '<form method="get" action="/audit/" class="filters" role="search">'
        f'<label>Date<select id="range" name="range">{_options(ranges, v["range"])}</select>'
        "</label>"
        '<label>From (UTC)<input type="datetime-local" step="1" id="from" name="from"'
        f' value="{e_(_local_input(v["from"]) if custom else "")}"></label>'
        '<label>To (UTC)<input type="datetime-local" step="1" id="to" name="to"'
        f' value="{e_(_local_input(v["to"]) if custom else "")}"></label>'
        f'<label>Action<select name="action">{_options(actions, v["action"])}</select></label>'
        f'<label>Status<select name="status">{_options(statuses, v["status"])}</select></label>'
        '<label>Identity (name contains, or id)<input type="search" name="identity"'
        f' value="{e_(v["identity"])}"></label>'
        f'<label>Change id<input type="search" name="changeId" value="{e_(v["changeId"])}">'
        "</label>"
        '<label>Client request id<input type="search" name="clientRequestId"'
        f' value="{e_(v["clientRequestId"])}"></label>'
        '<label>Error code<input type="search" name="errorCode"'
        f' value="{e_(v["errorCode"])}" placeholder="e.g. EntryConflict"></label>'
        f"{limit}"
        '<div class="actions"><button type="submit">Apply</button>'
        '<a class="button secondary" href="/audit/">Reset</a></div></form>'
    )


def _toolbar(filters: Filters, shown: int) -> str:
    label = RANGES[filters.values["range"]][0]
    if filters.values["range"] == "custom":
        since, until = filters.values["from"], filters.values["to"]
        label = f"From {since or 'the beginning'} to {until or 'now'} (UTC)"
    plural = "entry" if shown == 1 else "entries"
    return (
        '<div class="toolbar">'
        f'<span class="summary">{e_(label)} · {shown} {plural} on this page, newest first</span>'
        f'<a class="button secondary" id="export-csv" href="/audit/export?'
        f'{e_(filters.query(format="csv"))}">Download CSV</a>'
        f'<a class="button secondary" id="export-jsonl" href="/audit/export?'
        f'{e_(filters.query(format="jsonl"))}">Download JSON lines</a>'
        '<a class="button secondary" href="/audit/erasures">Erasures</a></div>'
    )


def _badge(status: str | None) -> str:
    return f'<span class="badge {e_(status)}">{e_(status)}</span>'


def _entry_url(entry: Mapping[str, Any], filters: Filters | None = None) -> str | None:
    try:
        entry_id = UUID(str(entry["id"]))
    except ValueError:
        return None  # an entry without a request id of its own has no page
    query = filters.query() if filters else ""
    return f"/audit/entries/{entry_id}" + (f"?{query}" if query else "")


def _when(iso: str) -> str:
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC)
    return f'<time datetime="{e_(iso)}">{moment:%Y-%m-%d %H:%M:%S} UTC</time>'


def _identity(target: Mapping[str, Any]) -> str:
    name = target.get("displayName")
    shown = f'<span class="name">{e_(name)}</span>' if name else '<span class="none">—</span>'
    if target.get("id"):
        shown += f'<br><code class="id">{e_(target["id"])}</code>'
    return shown


def _log_table(entries: list[dict[str, Any]], filters: Filters) -> str:
    if not entries:
        return '<p class="empty">No entries match these filters.</p>'
    rows = []
    for entry in entries:
        status = entry["provisioningStatusInfo"]["status"]
        error = entry["provisioningStatusInfo"]["errorInformation"] or {}
        url = _entry_url(entry, filters)
        when = _when(entry["activityDateTime"])
        date = f'<a href="{e_(url)}">{when}</a>' if url else when
        target = entry["targetIdentity"]
        rows.append(
            f'<tr data-status="{e_(status)}" data-action="{e_(entry["provisioningAction"])}">'
            f"<td>{date}</td>"
            f"<td>{_identity(target)}</td>"
            f"<td>{e_(target.get('identityType'))}</td>"
            f"<td>{e_(entry['provisioningAction'])}</td>"
            f"<td>{_badge(status)}</td>"
            f'<td class="error-code">{e_(error.get("errorCode"))}</td>'
            f"<td>{e_(entry['initiatedBy']['displayName'])}</td>"
            + (f'<td><a href="{e_(url)}">Details</a></td>' if url else "<td></td>")
            + "</tr>"
        )
    return (
        '<table class="log"><thead><tr><th>Date</th><th>Identity</th><th>Type</th>'
        "<th>Action</th><th>Status</th><th>Error code</th><th>Initiated by</th><th></th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _pager(filters: Filters, next_token: str | None) -> str:
    links = []
    if filters.next_token:
        links.append(f'<a class="button secondary" href="{e_(_list_url(filters))}">First page</a>')
    if next_token:
        href = "/audit/?" + filters.query(next=next_token)
        links.append(f'<a class="button" rel="next" href="{e_(href)}">Next page →</a>')
    return f'<nav class="pager">{"".join(links)}</nav>' if links else ""


def _history_pager(resource_id: str, page: Filters, next_token: str | None) -> str:
    base = f"/audit/resources/{resource_id}"
    limit = {"limit": str(page.limit)} if page.limit != PAGE_SIZE else {}
    links = []
    if page.next_token:
        first = base + (f"?{urlencode(limit)}" if limit else "")
        links.append(f'<a class="button secondary" href="{e_(first)}">First page</a>')
    if next_token:
        href = f"{base}?{urlencode({**limit, 'next': next_token})}"
        links.append(f'<a class="button" rel="next" href="{e_(href)}">Next page →</a>')
    return f'<nav class="pager">{"".join(links)}</nav>' if links else ""


def _list_url(filters: Filters) -> str:
    query = filters.query()
    return "/audit/" + (f"?{query}" if query else "")


def _value(value: Any) -> str:
    if value is None:
        return '<span class="none">(none)</span>'
    return f"<code>{e_(value)}</code>"


def _changes_table(properties: list[Mapping[str, Any]]) -> str:
    if not properties:
        return '<p class="empty">No properties changed.</p>'
    rows = "".join(
        f'<tr><th scope="row">{e_(p.get("displayName"))}</th>'
        f'<td class="old">{_value(p.get("oldValue"))}</td><td class="arrow">→</td>'
        f'<td class="new">{_value(p.get("newValue"))}</td></tr>'
        for p in properties
    )
    return (
        '<table class="changes"><thead><tr><th>Property</th><th>Old value</th><th></th>'
        f"<th>New value</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _facts(pairs: Iterable[tuple[str, str]]) -> str:
    return (
        '<dl class="facts">'
        + "".join(f"<dt>{e_(label)}</dt><dd>{value}</dd>" for label, value in pairs)
        + "</dl>"
    )


def _steps(entry: Mapping[str, Any]) -> str:
    """Entra's provisioning steps, as far as the service provider's side has them."""
    request, target = entry["request"], entry["targetIdentity"]
    status = entry["provisioningStatusInfo"]["status"]
    error = entry["provisioningStatusInfo"]["errorInformation"] or {}
    positions = entry["eventPositions"]
    count = len(entry["modifiedProperties"])
    steps: list[tuple[str, str, str]] = [
        (
            "success",
            "Received",
            f"{e_(request['method'])} <code>{e_(request['path'])}</code> from"
            f" {e_(entry['initiatedBy']['displayName'])}, change id"
            f" <code>{e_(entry['changeId'])}</code>",
        )
    ]
    if target.get("id"):
        steps.append(
            (
                "success",
                "Matched",
                f"{e_(target.get('identityType'))} {e_(target.get('displayName') or '')}"
                f" <code>{e_(target['id'])}</code>",
            )
        )
    if status == "success":
        changed = f"{count} propert{'y' if count == 1 else 'ies'} changed"
        steps.append(("success", "Processed", f"{e_(entry['provisioningAction'])}: {changed}"))
    elif status == "skipped":
        steps.append(("skipped", "Processed", "Nothing to change: the resource already matched"))
    else:
        steps.append(
            (
                "failure",
                "Processed",
                f"Refused: {e_(error.get('errorCode'))} — {e_(error.get('reason'))}",
            )
        )
    steps.append(
        (
            "success" if status != "failure" else "failure",
            "Recorded",
            f"Replied HTTP {e_(request['status'])} in {_duration(entry)};"
            f" {len(positions)} event{'' if len(positions) == 1 else 's'} stored at position"
            f"{'' if len(positions) == 1 else 's'} {e_(', '.join(map(str, positions)))}",
        )
    )
    icons = {"success": "✓", "failure": "✗", "skipped": "&#8211;"}
    items = "".join(
        f'<li class="{e_(s)}"><span class="icon" aria-label="{e_(s)}">{icons.get(s, "")}'
        f"</span><strong>{e_(name)}</strong> {text}</li>"
        for s, name, text in steps
    )
    return f'<ol class="steps">{items}</ol>'


def _duration(entry: Mapping[str, Any]) -> str:
    ms = entry.get("durationInMilliseconds")
    return "an unknown time" if ms is None else f"{float(ms):.1f} ms"


def _entry_detail(entry: Mapping[str, Any], filters: Filters) -> str:
    status = entry["provisioningStatusInfo"]["status"]
    error = entry["provisioningStatusInfo"]["errorInformation"]
    target, request = entry["targetIdentity"], entry["request"]
    title = (
        f"{e_(str(entry['provisioningAction']).capitalize())} {e_(target.get('identityType'))}"
        f" {e_(target.get('displayName') or '')}"
    )
    if error:
        code = error.get("errorCode")
        trouble = _facts(
            [
                ("Error code", f'<strong class="error-code">{e_(code)}</strong>'),
                ("Reason", e_(error.get("reason"))),
                ("Recommendation", e_(RECOMMENDATIONS.get(str(code), "—"))),
            ]
        )
    elif status == "skipped":
        trouble = '<p class="empty">No error: the resource already matched the request.</p>'
    else:
        trouble = '<p class="empty">No error: the request succeeded.</p>'
    positions = ", ".join(str(p) for p in entry["eventPositions"])
    change_url = "/audit/?" + urlencode({"range": "all", "changeId": entry["changeId"] or ""})
    request_facts = _facts(
        [
            ("Method", e_(request["method"])),
            ("Path", f"<code>{e_(request['path'])}</code>"),
            ("HTTP status", e_(request["status"])),
            ("Duration", e_(_duration(entry))),
            ("Event positions", f"<code>{e_(positions)}</code>"),
            (
                "Change id",
                f'<a href="{e_(change_url)}"><code>{e_(entry["changeId"])}</code></a>',
            ),
            ("Client request id (X-Request-Id)", _value(entry.get("clientRequestId"))),
            ("Initiated by", f"token {e_(entry['initiatedBy']['displayName'])}"),
        ]
    )
    history = ""
    if target.get("id"):
        history = (
            f'<p><a class="button" id="history" href="/audit/resources/{e_(target["id"])}">'
            "History of this resource →</a></p>"
        )
    summary = _facts(
        [
            ("Date", _when(entry["activityDateTime"])),
            ("Entry id", f"<code>{e_(entry['id'])}</code>"),
            ("Source id (externalId)", _value(entry["sourceIdentity"].get("id"))),
            ("Target id", _value(target.get("id"))),
            ("Target type", e_(target.get("identityType"))),
            ("Target display name", _value(target.get("displayName"))),
            ("Tenant id", f"<code>{e_(entry['tenantId'])}</code>"),
        ]
    )
    return (
        f'<article class="entry" data-status="{e_(status)}">'
        f"<h1>{title} {_badge(status)}</h1>"
        '<nav class="tabs"><a href="#steps">Steps</a><a href="#troubleshooting">'
        'Troubleshooting &amp; recommendations</a><a href="#modified">Modified properties</a>'
        '<a href="#request">Request</a><a href="#summary">Summary</a></nav>'
        f'<section id="steps"><h2>Steps</h2>{_steps(entry)}</section>'
        '<section id="troubleshooting"><h2>Troubleshooting &amp; recommendations</h2>'
        f"{trouble}</section>"
        '<section id="modified"><h2>Modified properties</h2>'
        f"{_changes_table(entry['modifiedProperties'])}</section>"
        f'<section id="request"><h2>Request</h2>{request_facts}</section>'
        f'<section id="summary"><h2>Summary</h2>{summary}{history}</section></article>'
    )


def _history(resource_id: str, entries: list[dict[str, Any]]) -> str:
    latest = entries[-1]["targetIdentity"]
    names = [e["targetIdentity"]["displayName"] for e in entries]
    name = next((n for n in reversed(names) if n), None)
    rows = []
    for entry in entries:
        status = entry["provisioningStatusInfo"]["status"]
        error = entry["provisioningStatusInfo"]["errorInformation"] or {}
        url = _entry_url(entry)
        when = _when(entry["activityDateTime"])
        changes = "".join(
            f"<li><strong>{e_(p.get('displayName'))}</strong>: {_value(p.get('oldValue'))}"
            f' <span class="arrow">→</span> {_value(p.get("newValue"))}</li>'
            for p in entry["modifiedProperties"]
        )
        if error:
            changes += (
                f'<li class="error-code">{e_(error.get("errorCode"))}:'
                f" {e_(error.get('reason'))}</li>"
            )
        date = f'<a href="{e_(url)}">{when}</a>' if url else when
        rows.append(
            f'<tr data-status="{e_(status)}">'
            f"<td>{date}</td>"
            f"<td>{e_(entry['provisioningAction'])}</td><td>{_badge(status)}</td>"
            f'<td><ul class="changes">{changes}</ul></td>'
            f"<td><code>{e_(entry['changeId'])}</code></td></tr>"
        )
    return (
        f"<h1>History of {e_(latest.get('identityType'))} {e_(name or '')}</h1>"
        f"<p>Resource id <code>{e_(resource_id)}</code> · every change, oldest first,"
        " a page at a time.</p>"
        '<table class="history"><thead><tr><th>Date</th><th>Action</th><th>Status</th>'
        f"<th>Changes (old → new)</th><th>Change id</th></tr></thead><tbody>{''.join(rows)}"
        "</tbody></table>"
    )


CSS = """
:root { --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --bg: #f6f8fa;
  --accent: #0b5cad; --ok: #1a7f37; --bad: #b42318; --skip: #7d5e00; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: #fff; }
header.top { display: flex; align-items: center; gap: 1rem; padding: .55rem 1.5rem;
  background: #0b2545; color: #fff; }
header.top > a { color: #fff; text-decoration: none; font-weight: 600; }
header.top .who { margin-left: auto; font-size: .9rem; }
header.top form { margin: 0; }
main { padding: 1rem 1.5rem 3rem; max-width: 1400px; }
h1 { font-size: 1.45rem; margin: .5rem 0 1rem; }
h2 { font-size: 1.1rem; margin: 1.6rem 0 .6rem; padding-bottom: .3rem;
  border-bottom: 1px solid var(--line); }
a { color: var(--accent); }
input, select, button { font: inherit; padding: .35rem .5rem; border: 1px solid #8c959f;
  border-radius: 4px; background: #fff; color: var(--fg); }
button, .button { display: inline-block; padding: .35rem .85rem; border-radius: 4px;
  border: 1px solid var(--accent); background: var(--accent); color: #fff; cursor: pointer;
  text-decoration: none; font-size: .95rem; }
button.secondary, .button.secondary { background: #fff; color: var(--accent); }
form.filters { display: flex; flex-wrap: wrap; gap: .75rem 1rem; align-items: flex-end;
  padding: .8rem 1rem; background: var(--bg); border: 1px solid var(--line); border-radius: 6px; }
form.filters label { display: flex; flex-direction: column; gap: .2rem; font-size: .8rem;
  color: var(--muted); }
form.filters .actions { display: flex; gap: .5rem; }
.toolbar { display: flex; flex-wrap: wrap; align-items: center; gap: .6rem; margin-top: 1rem; }
.toolbar .summary { margin-right: auto; color: var(--muted); }
table { width: 100%; border-collapse: collapse; margin-top: .8rem; }
th, td { text-align: left; vertical-align: top; padding: .45rem .6rem;
  border-bottom: 1px solid var(--line); }
thead th { font-size: .78rem; text-transform: uppercase; letter-spacing: .03em;
  color: var(--muted); background: var(--bg); }
table.log tbody tr:hover { background: #f0f6ff; }
tr[data-status="failure"] td:first-child { box-shadow: inset 3px 0 0 var(--bad); }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85em;
  overflow-wrap: anywhere; }
code.id { color: var(--muted); }
.badge { display: inline-block; padding: .05rem .55rem; border-radius: 999px; font-size: .8rem;
  font-weight: 600; vertical-align: middle; }
.badge.success { background: #dafbe1; color: var(--ok); }
.badge.failure { background: #ffebe9; color: var(--bad); }
.badge.skipped { background: #fff8c5; color: var(--skip); }
.error-code { color: var(--bad); font-weight: 600; }
.notice { padding: .6rem .9rem; border: 1px solid; border-radius: 6px; }
.notice.warn { background: #fff8c5; border-color: #d4a72c; }
.notice.error { background: #ffebe9; border-color: #ff8182; }
.notice.info { background: #ddf4ff; border-color: #54aeff; }
.none, .empty { color: var(--muted); font-style: italic; }
.pager { display: flex; gap: .6rem; margin-top: 1rem; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .35rem 1.5rem; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
nav.tabs { display: flex; flex-wrap: wrap; gap: .3rem 1.2rem; padding-bottom: .4rem;
  border-bottom: 2px solid var(--line); }
nav.tabs a { text-decoration: none; font-weight: 600; }
ol.steps { list-style: none; padding: 0; margin: 0; }
ol.steps li { padding: .35rem 0; }
ol.steps .icon { display: inline-block; width: 1.4rem; height: 1.4rem; margin-right: .5rem;
  border-radius: 50%; text-align: center; line-height: 1.4rem; font-weight: 700; }
ol.steps li.success .icon { background: #dafbe1; color: var(--ok); }
ol.steps li.failure .icon { background: #ffebe9; color: var(--bad); }
ol.steps li.skipped .icon { background: #fff8c5; color: var(--skip); }
table.changes th[scope="row"] { font-weight: 600; text-transform: none; font-size: .9rem;
  color: var(--fg); background: none; letter-spacing: 0; }
.arrow { color: var(--muted); }
ul.changes { margin: 0; padding-left: 1.1rem; }
section.sign-in { max-width: 34rem; margin: 3rem auto; }
form.sign-in { display: flex; flex-direction: column; gap: .5rem; }
form.sign-in input { font-family: ui-monospace, monospace; }
form.sign-in button { align-self: flex-start; }
"""

JS = """
// Optional: typing a date picks "Custom"; choosing a preset clears the dates.
document.addEventListener("DOMContentLoaded", () => {
  const range = document.getElementById("range");
  const dates = ["from", "to"].map((id) => document.getElementById(id)).filter(Boolean);
  if (!range) return;
  for (const input of dates) {
    input.addEventListener("input", () => { if (input.value) range.value = "custom"; });
  }
  range.addEventListener("change", () => {
    if (range.value !== "custom") for (const input of dates) input.value = "";
  });
});
"""
