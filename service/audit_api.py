"""`/audit/v1`: the provisioning log for compliance officers (an audit token's tenant only)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from aiohttp import web
from yarl import URL

from domain.group import Group
from domain.user import User
from service import audit_queries as q
from service.audit_export import (
    CONTENT_TYPES,
    FORMATS,
    ExportPage,
    ExportWriter,
    export_chunks,
    export_page,
)
from service.boundary import in_utc
from service.errors import ScimError
from service.scim.groups import group_resource, member_entry
from service.scim.representation import user_resource
from service.state import DATABASE, PRINCIPAL, SETTINGS, base_url
from service.streams import streaming


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _filter(request: web.Request) -> q.AuditFilter:
    try:
        return q.AuditFilter.parse(request.query)
    except q.BadQuery as e:
        raise ScimError(400, str(e), "invalidValue") from None


def _limit(request: web.Request) -> int:
    """`limit` (default 50); above audit_queries.MAX_LIMIT it is capped, not refused."""
    try:
        return int(request.query.get("limit", "50"))
    except ValueError:
        raise ScimError(400, "limit must be an integer", "invalidValue") from None


async def entries(request: web.Request) -> web.Response:
    where = _filter(request)
    limit = _limit(request)
    pool = request.app[DATABASE].pool
    # Lag first: the page read after it holds at least everything the lag says is applied.
    lag = await q.lag(pool, request[PRINCIPAL].tenant_id)
    try:
        found, next_token = await q.page(
            pool, request[PRINCIPAL].tenant_id, where, limit, request.query.get("next")
        )
    except q.BadQuery as e:
        raise ScimError(400, str(e), "invalidValue") from None
    return _json({"entries": found, "next": next_token, "lag": lag})


async def entry(request: web.Request) -> web.Response:
    found = await q.one(
        request.app[DATABASE].pool, request[PRINCIPAL].tenant_id, request.match_info["id"]
    )
    if found is None:
        raise ScimError(404, f"audit entry {request.match_info['id']} not found")
    return _json(found)


async def export(request: web.Request) -> web.StreamResponse:
    fmt = request.query.get("format", "jsonl")
    if fmt not in FORMATS:
        raise ScimError(400, "format must be csv or jsonl", "invalidValue")
    where, tenant_id = _filter(request), request[PRINCIPAL].tenant_id
    try:
        page = await export_page_of(request, tenant_id, where)
    except q.BadQuery as e:
        raise ScimError(400, str(e), "invalidValue") from None
    next_url = request.rel_url.update_query(next=page.next_token) if page.next_token else None
    return await write_export(request, tenant_id, where, page, fmt, next_url)


async def export_page_of(request: web.Request, tenant_id: UUID, where: q.AuditFilter) -> ExportPage:
    """The page of the export this request asks for (its `next`, if any), within the limits
    (SCIMLEDGER_MAX_EXPORT_ENTRIES, SCIMLEDGER_MAX_EXPORT_BYTES); BadQuery for a bad token."""
    settings = request.app[SETTINGS]
    return await export_page(
        request.app[DATABASE].pool,
        tenant_id,
        where,
        request.query.get("next") or None,
        settings.max_export_entries,
        settings.max_export_bytes,
    )


async def write_export(
    request: web.Request,
    tenant_id: UUID,
    where: q.AuditFilter,
    page: ExportPage,
    fmt: str,
    next_url: URL | None,
    filename: str = "provisioning-log",
) -> web.StreamResponse:
    """Stream a page of the export as CSV or JSON lines (shared with the web pages); a page
    that continues a file has no CSV header, and one that is not the last names the next in
    its `Link` header."""
    headers = {
        "Content-Type": CONTENT_TYPES[fmt],
        "Content-Disposition": f'attachment; filename="{filename}.{fmt}"',
        "Cache-Control": "no-store",
    }
    if next_url is not None:
        headers["Link"] = f'<{next_url}>; rel="next"'
    response = web.StreamResponse(headers=headers)
    # Read in chunks from the pool one at a time: no connection is held while the client reads.
    out = ExportWriter(fmt, header=page.after is None)
    data = export_chunks(request.app[DATABASE].pool, tenant_id, where, page, out)
    async with streaming(request, response) as stream:
        async for piece in data:
            await stream.write(piece)
    return response


async def history(request: web.Request) -> web.Response:
    resource_id = _resource_id(request)
    limit = _limit(request)
    try:
        found, next_token = await q.history(
            request.app[DATABASE].pool,
            request[PRINCIPAL].tenant_id,
            resource_id,
            limit,
            request.query.get("next"),
        )
    except q.BadQuery as e:
        raise ScimError(400, str(e), "invalidValue") from None
    return _json({"resource": str(resource_id), "entries": found, "next": next_token})


async def resource_at(request: web.Request) -> web.Response:
    """The SCIM resource as it was at `at`, rebuilt from its events."""
    resource_id = _resource_id(request)
    raw = request.query.get("at")
    if not raw:
        raise ScimError(400, "at (an ISO 8601 date-time) is required", "invalidValue")
    try:
        at = datetime.fromisoformat(raw.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise ScimError(400, "at must be an ISO 8601 date-time", "invalidValue") from None
    if at.tzinfo is None:
        raise ScimError(400, "at must carry a time zone (e.g. Z)", "invalidValue")
    if in_utc(at) is None:
        raise ScimError(400, "at is out of range (years 1 to 9999 in UTC)", "invalidValue")
    db = request.app[DATABASE]
    tenant_id = request[PRINCIPAL].tenant_id
    cap = request.app[SETTINGS].max_replay_events
    # Only this tenant's stream is read (another tenant's reads as empty: 404), and at most
    # `cap` events of it. A bound rather than snapshots: time travel is an officer's
    # occasional question, and snapshots would add a table kept by the write path (or the
    # audit projection) and a shape to upcast per aggregate; a user's stream stays far below
    # the cap. Past it the question is refused (400 tooMany), never answered from a cut stream.
    stream = await db.store.read_stream_until(db.pool, tenant_id, resource_id, at, cap + 1)
    if len(stream) > cap:
        raise ScimError(
            400,
            f"resource {resource_id} had more than {cap} events by {raw}; this service replays"
            " at most that many (SCIMLEDGER_MAX_REPLAY_EVENTS)",
            "tooMany",
        )
    aggregate: Any = None
    members: dict[str, str | None] = {}
    for recorded in stream:
        event: Any = db.store.to_domain(recorded)
        aggregate = event.mutate(aggregate)
        if type(event).__name__ == "GroupMembershipChanged":
            for member in event.removed:
                members.pop(member, None)
            for member in event.added:
                members[member] = event.displays.get(member)
    if aggregate is None or getattr(aggregate, "tenant_id", None) != tenant_id:
        raise ScimError(404, f"resource {resource_id} did not exist at {raw}")
    base = base_url(request)
    if isinstance(aggregate, User) and not aggregate.deprovisioned:
        return _json(
            user_resource(
                aggregate.state,
                user_id=str(resource_id),
                version=aggregate.version,
                created=aggregate.created_on,
                last_modified=aggregate.modified_on,
                location=f"{base}/Users/{resource_id}",
            )
        )
    if isinstance(aggregate, Group) and not aggregate.deleted:
        resource = group_resource(
            base,
            resource_id,
            aggregate.display_name,
            aggregate.external_id,
            aggregate.version,
            aggregate.created_on,
            aggregate.modified_on,
            aggregate.extensions,
        )
        types = await q.member_types(db.pool, tenant_id, list(members))
        resource["members"] = [
            member_entry(base, UUID(m), types.get(m, "User"), d) for m, d in sorted(members.items())
        ]
        return _json(resource)
    raise ScimError(404, f"resource {resource_id} did not exist at {raw}")


def _resource_id(request: web.Request) -> UUID:
    try:
        return UUID(request.match_info["id"])
    except ValueError:
        raise ScimError(404, f"resource {request.match_info['id']} not found") from None


def add_routes(app: web.Application) -> None:
    app.router.add_get("/audit/v1/entries", entries)
    app.router.add_get("/audit/v1/entries/{id}", entry)
    app.router.add_get("/audit/v1/export", export)
    app.router.add_get("/audit/v1/resources/{id}/history", history)
    app.router.add_get("/audit/v1/resources/{id}", resource_at)
    from service import erasure_api  # issue 17: erasures, kept apart

    erasure_api.add_routes(app)
