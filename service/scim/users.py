"""`/scim/v2/Users`: parse the request, call a handler, shape the reply."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
import orjson
from aiohttp import web

from domain.user import User
from projections import memberships
from projections import users as users_view
from service.commands import CreateUser, DeleteUser, PatchUser, ReplaceUser, Unique
from service.errors import invalid_syntax, invalid_value, not_found, scim_json
from service.handlers import Caller, Handlers, etag_matches
from service.scim.declared import (
    coerce_declared,
    declared_for,
    excluding,
    hidden,
    unique_attributes,
)
from service.scim.filter import user_filter_sql, user_sort_sql
from service.scim.lists import (
    ListQuery,
    View,
    fetch_page,
    list_response,
    parse_list_query,
    search_params,
)
from service.scim.patch import parse_patch_request
from service.scim.representation import select_attributes, user_from_scim, user_resource
from service.state import (
    DATABASE,
    HANDLERS,
    PRINCIPAL,
    REQUEST_CONTEXT,
    REQUEST_ID,
    SETTINGS,
    base_url,
)

T = TypeVar("T")
Endpoint = Callable[[web.Request], Awaitable[web.Response]]


def caller(request: web.Request) -> Caller:
    return Caller(request[PRINCIPAL].tenant_id, request[REQUEST_ID], request.get(REQUEST_CONTEXT))


def handlers(request: web.Request) -> Handlers:
    return request.app[HANDLERS]


def parse_id(raw: str, kind: str = "User") -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise not_found(kind, raw) from None


def etag(version: int) -> str:
    return f'W/"{version}"'


# A body larger than this is read (parsed, checked, turned into a desired state) in a worker
# thread: the event loop takes the GIL back every few milliseconds and keeps answering the
# other requests, instead of waiting for the whole body (up to ~0.1 s of CPU at 2 MiB).
THREAD_BODY_BYTES = 64 * 1024


async def off_loop(size: int, work: Callable[[], T]) -> T:
    """`work()`, in a worker thread when it reads a body of `size` bytes past THREAD_BODY_BYTES."""
    if size > THREAD_BODY_BYTES:
        return await asyncio.to_thread(work)
    return work()


async def json_body(request: web.Request) -> Any:
    raw = await request.read()
    max_length = request.app[SETTINGS].max_string_length
    return await off_loop(len(raw), partial(_parse_body, raw, max_length))


def _parse_body(raw: bytes, max_length: int) -> Any:
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_BODY_CONTAINERS:
        # Counted before parsing (at C speed): building 2 MiB of `[[[...]]]` as Python lists
        # would take half a second of the event loop. Brackets inside strings count too.
        raise invalid_value(
            f"The request body holds more than {MAX_BODY_CONTAINERS} objects and arrays"
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid_syntax("The request body is not valid JSON") from None
    if b"\\u0000" in raw and _holds_nul(body):
        # Valid JSON, but PostgreSQL text and jsonb cannot hold U+0000.
        raise invalid_value("Strings in the request body cannot contain NUL (U+0000)")
    # A body of at most max_length bytes holds no longer string, and one with fewer brackets
    # than MAX_BODY_DEPTH nests no deeper: then there is nothing for the walk to find.
    if isinstance(body, dict | list) and (len(raw) > max_length or containers >= MAX_BODY_DEPTH):
        _check_string_lengths(body, max_length)
    elif isinstance(body, str):
        _check_length(body, max_length)
    return body


def _holds_nul(value: Any) -> bool:
    pending = [value]
    while pending:  # iterative: orjson allows nesting deeper than Python's recursion limit
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


# SCIM bodies nest a few levels (a PATCH value of the enterprise manager: six); a walk that
# stops here refuses deeply nested lists at their first branch. And a body of 2 MiB holds at
# most ~45,000 member objects (`{"value": id}`): far fewer than this many objects and arrays.
MAX_BODY_DEPTH = 32
MAX_BODY_CONTAINERS = 100_000


def _check_string_lengths(value: Any, max_length: int) -> None:
    """400 invalidValue for any string of a body (a member name too) past max_length, or for
    a body nested deeper than MAX_BODY_DEPTH. One visit per value."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:  # iterative, as _holds_nul
        item, depth = pending.pop()
        if depth >= MAX_BODY_DEPTH:
            raise invalid_value(f"The request body is nested deeper than {MAX_BODY_DEPTH} levels")
        if isinstance(item, dict):
            for key in item:
                _check_length(key, max_length)
            children = item.values()
        else:
            children = item
        for child in children:
            if isinstance(child, str):
                _check_length(child, max_length)
            elif isinstance(child, dict | list):
                pending.append((child, depth + 1))


def _check_length(text: str, max_length: int) -> None:
    if len(text) > max_length:
        raise invalid_value(
            f"A string in the request body is {len(text)} characters long; at most"
            f" {max_length} are accepted (SCIMLEDGER_MAX_STRING_LENGTH)"
        )


async def json_object(request: web.Request) -> dict[str, Any]:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise invalid_syntax("The request body must be a JSON object")
    return body


async def groups_of(request: web.Request, user_ids: list[UUID]) -> dict[UUID, list[dict[str, str]]]:
    """The read-only `groups` attribute: each user's direct groups, from the membership rows."""
    rows = await memberships.groups_of_members(
        request.app[DATABASE].pool, request[PRINCIPAL].tenant_id, user_ids
    )
    base = base_url(request)
    found: dict[UUID, list[dict[str, str]]] = {}
    for row in rows:
        found.setdefault(row["member_id"], []).append(
            _group_ref(base, str(row["id"]), row["display_name"])
        )
    return found


def _group_ref(base: str, group_id: str, display: str) -> dict[str, str]:
    """One of a user's `groups` (RFC 7643 §4.1.2): its direct groups only."""
    return {
        "value": group_id,
        "$ref": f"{base}/Groups/{group_id}",
        "display": display,
        "type": "direct",
    }


def _wants_groups(attributes: str | None, excluded: str | None) -> bool:
    probe = {"schemas": [], "id": "", "groups": [{"value": ""}]}
    return "groups" in select_attributes(probe, attributes, excluded)


async def _resource_of_user(
    request: web.Request, user: User, *, new: bool = False
) -> dict[str, Any]:
    groups = None
    # A user created by this very request is in no group yet: no query for it.
    if not new and _wants_groups(
        request.query.get("attributes"), request.query.get("excludedAttributes")
    ):
        groups = (await groups_of(request, [user.id])).get(user.id)
    return user_resource(
        # Sorted as `user.state` is, not copied twice: user_resource copies what it shows.
        dict(sorted(user.state_view.items())),
        user_id=str(user.id),
        version=user.version,
        created=user.created_on,
        last_modified=user.modified_on,
        location=f"{base_url(request)}/Users/{user.id}",
        groups=groups,
    )


def _resource_of_row(
    request: web.Request, row: asyncpg.Record, groups: list[dict[str, str]] | None
) -> dict[str, Any]:
    return user_resource(
        row["resource"],
        user_id=str(row["id"]),
        version=row["version"],
        created=row["created"],
        last_modified=row["last_modified"],
        location=f"{base_url(request)}/Users/{row['id']}",
        groups=groups,
    )


def _reply(
    request: web.Request, resource: dict[str, Any], version: int, status: int = 200
) -> web.Response:
    q = request.query
    excluded = excluding(
        q.get("excludedAttributes"),
        hidden(request[PRINCIPAL].declared, "User", q.get("attributes")),
    )
    attributes = q.get("attributes")
    # A resource made for this reply is shown whole as it is when nothing is selected.
    body = select_attributes(resource, attributes, excluded) if attributes or excluded else resource
    headers = {"ETag": etag(version)}
    if status == 201:
        headers["Location"] = resource["meta"]["location"]
    return scim_json(body, status=status, headers=headers)


def _large(request: web.Request) -> bool:
    """A large body: the handler changes the user in a worker thread."""
    return (request.content_length or 0) > THREAD_BODY_BYTES


async def _desired(request: web.Request) -> dict[str, Any]:
    """The desired state a POST or PUT body describes (off the loop when the body is large)."""
    body = await json_object(request)
    max_values = request.app[SETTINGS].max_multi_values
    declared = declared_for(request[PRINCIPAL].declared, "User")

    def work() -> dict[str, Any]:
        state = user_from_scim(
            body, max_values, reject=rejects_undeclared(request), declared=declared
        )
        return coerce_declared(state, declared)

    return await off_loop(request.content_length or 0, work)


def _unique(request: web.Request) -> tuple[Unique, ...]:
    declared = declared_for(request[PRINCIPAL].declared, "User")
    return tuple(Unique(*attribute) for attribute in unique_attributes(declared))


def rejects_undeclared(request: web.Request) -> bool:
    """The tenant's `--undeclared reject`: undeclared extension attributes are a 400."""
    return bool(request[PRINCIPAL].undeclared == "reject")


async def create(request: web.Request) -> web.Response:
    desired = await _desired(request)
    user = await handlers(request).create_user(
        caller(request), CreateUser(desired, _unique(request))
    )
    return _reply(
        request, await _resource_of_user(request, user, new=True), user.version, status=201
    )


async def get(request: web.Request) -> web.StreamResponse:
    user_id = parse_id(request.match_info["id"])
    tenant_id = request[PRINCIPAL].tenant_id
    # The user and its groups in one round trip (a busy server's round trips are what its
    # latency is made of).
    wants = _wants_groups(request.query.get("attributes"), request.query.get("excludedAttributes"))
    extra = memberships.GROUPS_OF_ROW if wants else None
    row = await users_view.fetch_one(request.app[DATABASE].pool, tenant_id, user_id, extra)
    if row is None:
        raise not_found("User", str(user_id))
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match and etag_matches(if_none_match, row["version"]):
        return web.Response(status=304, headers={"ETag": etag(row["version"])})
    groups = _groups_of_extra(base_url(request), row["extra"]) if wants and row["extra"] else None
    return _reply(request, _resource_of_row(request, row, groups), row["version"])


def _groups_of_extra(base: str, extra: list[list[str]]) -> list[dict[str, str]]:
    """The `groups` attribute from GROUPS_OF_ROW's [[id, displayName], ...]."""
    return [_group_ref(base, group_id, display) for group_id, display in extra]


async def replace(request: web.Request) -> web.Response:
    user_id = parse_id(request.match_info["id"])
    command = ReplaceUser(
        user_id,
        await _desired(request),
        request.headers.get("If-Match"),
        _large(request),
        _unique(request),
        declared=declared_for(request[PRINCIPAL].declared, "User"),
    )
    user = await handlers(request).replace_user(caller(request), command)
    return _reply(request, await _resource_of_user(request, user), user.version)


async def patch(request: web.Request) -> web.Response:
    user_id = parse_id(request.match_info["id"])
    settings = request.app[SETTINGS]
    operations = parse_patch_request(await json_body(request), settings.max_patch_operations)
    command = PatchUser(
        user_id,
        tuple(operations),
        request.headers.get("If-Match"),
        _large(request),
        _unique(request),
        max_values=settings.max_multi_values,
        max_bytes=settings.max_body_bytes,
        reject=rejects_undeclared(request),
        declared=declared_for(request[PRINCIPAL].declared, "User"),
    )
    user = await handlers(request).patch_user(caller(request), command)
    return _reply(request, await _resource_of_user(request, user), user.version)


async def delete(request: web.Request) -> web.Response:
    user_id = parse_id(request.match_info["id"])
    command = DeleteUser(user_id, request.headers.get("If-Match"))
    await handlers(request).delete_user(caller(request), command)
    return web.Response(status=204)


USERS_VIEW = View("scim_users", "u", users_view.COLUMNS, user_filter_sql, user_sort_sql)


async def _search(request: web.Request, query: ListQuery) -> dict[str, Any]:
    pool = request.app[DATABASE].pool
    wants = _wants_groups(query.attributes, query.excluded_attributes)
    extra = memberships.GROUPS_OF_ROW if wants else None
    declared = declared_for(request[PRINCIPAL].declared, "User")
    page = await fetch_page(pool, USERS_VIEW, request[PRINCIPAL].tenant_id, query, extra, declared)
    resources = _page(request, page.rows, query, wants)
    return list_response(resources, page.total, query, page.next_cursor)


def list_endpoints(
    page: Callable[[web.Request, ListQuery], Awaitable[dict[str, Any]]],
) -> tuple[Endpoint, Endpoint]:
    """GET /{type} and POST /{type}/.search of a resource type (RFC 7644 §3.4.2, §3.4.3):
    the same ListQuery, from the query string or from a SearchRequest body, answered by `page`."""

    async def list_(request: web.Request) -> web.Response:
        query = parse_list_query(request.query, request.app[SETTINGS].max_results)
        return scim_json(await page(request, query))

    async def search(request: web.Request) -> web.Response:
        params = search_params(await json_body(request))
        query = parse_list_query(params, request.app[SETTINGS].max_results)
        return scim_json(await page(request, query))

    return list_, search


list_, search = list_endpoints(_search)


def _page(
    request: web.Request, rows: list[Any], query: ListQuery, wants: bool
) -> list[dict[str, Any]]:
    names = hidden(request[PRINCIPAL].declared, "User", query.attributes)
    excluded = excluding(query.excluded_attributes, names)
    groups: dict[UUID, list[dict[str, str]]] = {}
    if wants:
        base = base_url(request)
        for row in rows:
            if row["extra"]:
                groups[row["id"]] = _groups_of_extra(base, row["extra"])
    return [
        select_attributes(
            _resource_of_row(request, row, groups.get(row["id"])),
            query.attributes,
            excluded,
        )
        for row in rows
    ]


def add_routes(app: web.Application) -> None:
    app.router.add_post("/scim/v2/Users", create)
    app.router.add_get("/scim/v2/Users", list_)
    app.router.add_post("/scim/v2/Users/.search", search)
    app.router.add_get("/scim/v2/Users/{id}", get)
    app.router.add_put("/scim/v2/Users/{id}", replace)
    app.router.add_patch("/scim/v2/Users/{id}", patch)
    app.router.add_delete("/scim/v2/Users/{id}", delete)
