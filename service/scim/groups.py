"""`/scim/v2/Groups`: parse the request, call a handler, shape the reply.

Members are read from their rows and, for one group, streamed: a group of 100,000 members is
written to the client in keyset pages, never built as one list, and no database connection is
held while the client takes them (service/streams.py).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import datetime
from functools import partial
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from aiohttp import web

from domain.group import Group
from projections import groups as groups_view
from projections import memberships
from service.commands import ChangeGroup, CreateGroup, DeleteGroup, GroupEdit
from service.errors import SCIM_CONTENT_TYPE, invalid_value, not_found, scim_json
from service.handlers import etag_matches
from service.scim.declared import Declared, coerce_declared, declared_for, excluding, hidden
from service.scim.filter import group_filter_sql, group_sort_sql
from service.scim.group_patch import (
    AD_GROUP_SCHEMA,
    GROUP_SCHEMA,
    fold_operations,
    members_of,
)
from service.scim.lists import (
    ListQuery,
    View,
    fetch_page,
    list_response,
)
from service.scim.patch import parse_patch_request
from service.scim.representation import extensions_from_scim, scim_timestamp, select_attributes
from service.scim.users import (
    caller,
    etag,
    handlers,
    json_body,
    json_object,
    list_endpoints,
    off_loop,
    parse_id,
    rejects_undeclared,
)
from service.state import DATABASE, PRINCIPAL, SETTINGS, base_url
from service.streams import StreamCut, streaming


def group_resource(
    base: str,
    group_id: UUID,
    display_name: str,
    external_id: str | None,
    version: int,
    created: datetime,
    last_modified: datetime,
    extensions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    resource: dict[str, Any] = {"schemas": [GROUP_SCHEMA, *(extensions or ())], "id": str(group_id)}
    if external_id is not None:
        resource["externalId"] = external_id
    resource["displayName"] = display_name
    for urn, attributes in (extensions or {}).items():
        resource[urn] = copy.deepcopy(attributes)
    resource["meta"] = {
        "resourceType": "Group",
        "created": scim_timestamp(created),
        "lastModified": scim_timestamp(last_modified),
        "location": f"{base}/Groups/{group_id}",
        "version": etag(version),
    }
    return resource


def _of_group(base: str, group: Group) -> dict[str, Any]:
    return group_resource(
        base,
        group.id,
        group.display_name,
        group.external_id,
        group.version,
        group.created_on,
        group.modified_on,
        group.extensions,
    )


def _of_row(base: str, row: asyncpg.Record) -> dict[str, Any]:
    return group_resource(
        base,
        row["id"],
        row["display_name"],
        row["external_id"],
        row["version"],
        row["created"],
        row["last_modified"],
        row["extensions"],
    )


def member_entry(
    base: str, member_id: UUID, member_type: str, display: str | None = None
) -> dict[str, str]:
    kind = "Groups" if member_type == "Group" else "Users"
    entry = {"value": str(member_id), "$ref": f"{base}/{kind}/{member_id}", "type": member_type}
    if display is not None:
        entry["display"] = display
    return entry


def wants_members(attributes: str | None, excluded: str | None) -> bool:
    """Would `members` survive this attribute selection? (The same rules as every attribute.)"""
    probe = {"schemas": [GROUP_SCHEMA], "id": "", "members": [{"value": ""}]}
    return "members" in select_attributes(probe, attributes, excluded)


def _selection(request: web.Request) -> tuple[str | None, str | None]:
    """attributes and excludedAttributes, the latter with the declared attributes a reply
    leaves out (`returned: never` or `request`)."""
    attributes = request.query.get("attributes")
    names = hidden(request[PRINCIPAL].declared, "Group", attributes)
    return attributes, excluding(request.query.get("excludedAttributes"), names)


# -- reads ----------------------------------------------------------------------------------


async def get(request: web.Request) -> web.StreamResponse:
    group_id = parse_id(request.match_info["id"], "Group")
    return await _reply_group(request, group_id, 200)


async def _reply_group(
    request: web.Request, group_id: UUID, status: int, location: bool = False, written: bool = False
) -> web.StreamResponse:
    tenant_id = request[PRINCIPAL].tenant_id
    attributes, excluded = _selection(request)
    base = base_url(request)
    pool = request.app[DATABASE].pool
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await groups_view.fetch(conn, tenant_id, [group_id])
        if not rows:
            raise not_found("Group", str(group_id))
        row = rows[0]
        headers = {"ETag": etag(row["version"])}
        if_none_match = request.headers.get("If-None-Match")
        if status == 200 and if_none_match and etag_matches(if_none_match, row["version"]):
            return web.Response(status=304, headers=headers)
        resource = _of_row(base, row)
        if location:
            headers["Location"] = resource["meta"]["location"]
        body = select_attributes(resource, attributes, excluded)
        if not wants_members(attributes, excluded):
            return scim_json(body, status=status, headers=headers)
        members = await memberships.member_page(conn, tenant_id, group_id, None)
    # Stream: everything but members, then the members page by page, then the close. No
    # connection is held while a write waits for the client: each further page is read in a
    # short transaction of its own, which also checks that the group is still at the version
    # sent in the ETag (otherwise the reply is cut: truncated, never a mix of two versions).
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = SCIM_CONTENT_TYPE
    async with streaming(request, response, capped=not written) as out:
        meta = body.pop("meta", None)
        head = orjson.dumps(body)
        await out.write(head[:-1] + (b',"members":[' if len(head) > 2 else b'"members":['))
        first = True
        while True:
            chunk: list[bytes] = []
            for member in members:
                entry = orjson.dumps(member_entry(base, *member.values()))
                chunk.append(entry if first else b"," + entry)
                first = False
            await out.write(b"".join(chunk))
            if len(members) < memberships.MEMBER_PAGE:
                break
            members = await _next_member_page(
                pool, tenant_id, group_id, row["version"], members[-1]["member_id"]
            )
        tail = b"]" + (b',"meta":' + orjson.dumps(meta) if meta is not None else b"") + b"}"
        await out.write(tail)
    return response


async def _next_member_page(
    pool: asyncpg.Pool, tenant_id: UUID, group_id: UUID, version: int, after: UUID
) -> list[asyncpg.Record]:
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        now = await memberships.group_version(conn, tenant_id, group_id)
        if now != version:
            raise StreamCut("the group changed while its members were sent")
        return await memberships.member_page(conn, tenant_id, group_id, after)


GROUPS_VIEW = View("scim_groups", "g", groups_view.COLUMNS, group_filter_sql, group_sort_sql)


async def _search(request: web.Request, query: ListQuery) -> dict[str, Any]:
    tenant_id: UUID = request[PRINCIPAL].tenant_id
    pool = request.app[DATABASE].pool
    declared = declared_for(request[PRINCIPAL].declared, "Group")
    page = await fetch_page(pool, GROUPS_VIEW, tenant_id, query, declared=declared)
    rows = page.rows
    base = base_url(request)
    resources = [_of_row(base, row) for row in rows]
    if rows and wants_members(query.attributes, query.excluded_attributes):
        members = await memberships.members_of_groups(pool, tenant_id, [r["id"] for r in rows])
        by_group: dict[UUID, list[dict[str, str]]] = {}
        for m in members:
            by_group.setdefault(m["group_id"], []).append(
                member_entry(base, m["member_id"], m["member_type"], m["display"])
            )
        for resource, row in zip(resources, rows, strict=True):
            if row["id"] in by_group:
                resource["members"] = by_group[row["id"]]
    names = hidden(request[PRINCIPAL].declared, "Group", query.attributes)
    excluded = excluding(query.excluded_attributes, names)
    selected = [select_attributes(r, query.attributes, excluded) for r in resources]
    return list_response(selected, page.total, query, page.next_cursor)


list_, search = list_endpoints(_search)


# -- writes ---------------------------------------------------------------------------------


def _change_from_body(
    body: dict[str, Any],
    max_members: int | None = None,
    max_values: int | None = None,
    *,
    reject: bool = False,
    declared: Declared | None = None,
) -> GroupEdit:
    """A POST/PUT body as a change: the attributes it sets and its full member list (at most
    `max_members`, Settings.max_patch_members, as one PATCH operation may name); undeclared
    extensions kept (or, with `reject`, refused)."""
    keyed = {k.lower(): v for k, v in body.items()}
    schemas = keyed.get("schemas")
    if schemas is not None and not isinstance(schemas, list):
        raise invalid_value("schemas must be a list")
    display_name = keyed.get("displayname")
    if display_name is not None and not isinstance(display_name, str):
        raise invalid_value("displayName must be a string")
    external_id = keyed.get("externalid")
    if external_id is not None and not isinstance(external_id, str):
        raise invalid_value("externalId must be a string")
    change = GroupEdit(display_name=display_name, external_id=external_id or None)
    declared = declared or {}
    extensions = extensions_from_scim(
        body, (GROUP_SCHEMA,), max_values, reject=reject, declared=declared
    )
    change.extensions = coerce_declared(extensions, declared)
    change.declared = declared
    members = members_of(keyed.get("members"), limit=max_members)
    change.replace_members(set(members))
    change.displays = {m: d for m, d in members.items() if d}
    return change


async def _change_of(request: web.Request, body: dict[str, Any]) -> GroupEdit:
    settings = request.app[SETTINGS]
    work = partial(
        _change_from_body,
        body,
        settings.max_patch_members,
        settings.max_multi_values,
        reject=rejects_undeclared(request),
        declared=declared_for(request[PRINCIPAL].declared, "Group"),
    )
    return await off_loop(request.content_length or 0, work)


async def create(request: web.Request) -> web.StreamResponse:
    body = await json_object(request)
    _ = AD_GROUP_SCHEMA  # accepted in "schemas" like any other URN; nothing of it is kept
    edit = await _change_of(request, body)
    group = await handlers(request).create_group(caller(request), CreateGroup(edit))
    return await _write_reply(request, group, 201)


async def replace(request: web.Request) -> web.StreamResponse:
    group_id = parse_id(request.match_info["id"], "Group")
    edit = await _change_of(request, await json_object(request))
    if edit.display_name is None:
        raise invalid_value("displayName is required")
    command = ChangeGroup(group_id, edit, request.headers.get("If-Match"))
    group = await handlers(request).change_group(caller(request), command)
    return await _write_reply(request, group, 200)


async def patch(request: web.Request) -> web.StreamResponse:
    group_id = parse_id(request.match_info["id"], "Group")
    settings = request.app[SETTINGS]
    operations = parse_patch_request(await json_body(request), settings.max_patch_operations)
    size = request.content_length or 0
    fold = partial(
        fold_operations,
        operations,
        settings.max_patch_members,
        settings.max_multi_values,
        reject=rejects_undeclared(request),
        declared=declared_for(request[PRINCIPAL].declared, "Group"),
    )
    edit = await off_loop(size, fold)
    command = ChangeGroup(group_id, edit, request.headers.get("If-Match"))
    group = await handlers(request).change_group(caller(request), command)
    if "attributes" not in request.query and "excludedAttributes" not in request.query:
        # Entra expects 204 for group PATCH; a reply must never be forced to carry members.
        return web.Response(status=204, headers={"ETag": etag(group.version)})
    return await _write_reply(request, group, 200)


async def delete(request: web.Request) -> web.Response:
    group_id = parse_id(request.match_info["id"], "Group")
    command = DeleteGroup(group_id, request.headers.get("If-Match"))
    await handlers(request).delete_group(caller(request), command)
    return web.Response(status=204)


async def _write_reply(request: web.Request, group: Group, status: int) -> web.StreamResponse:
    attributes, excluded = _selection(request)
    if wants_members(attributes, excluded):
        return await _reply_group(request, group.id, status, location=status == 201, written=True)
    resource = _of_group(base_url(request), group)
    headers = {"ETag": etag(group.version)}
    if status == 201:
        headers["Location"] = resource["meta"]["location"]
    return scim_json(select_attributes(resource, attributes, excluded), status, headers)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/scim/v2/Groups", create)
    app.router.add_get("/scim/v2/Groups", list_)
    app.router.add_post("/scim/v2/Groups/.search", search)
    app.router.add_get("/scim/v2/Groups/{id}", get)
    app.router.add_put("/scim/v2/Groups/{id}", replace)
    app.router.add_patch("/scim/v2/Groups/{id}", patch)
    app.router.add_delete("/scim/v2/Groups/{id}", delete)
