"""ListResponse queries (RFC 7644 §3.4.2, §3.4.3) and cursor pagination (RFC 9865).

The same parameters arrive as a GET query string or as a POST .search body; both become one
`ListQuery`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from service.errors import ScimError, invalid_syntax, invalid_value
from service.scim.declared import unique_attributes
from service.scim.filter import SqlParams

LIST_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
SEARCH_REQUEST = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"


@dataclass(frozen=True, slots=True)
class ListQuery:
    filter: str | None
    start_index: int
    count: int
    sort_by: str | None
    descending: bool
    attributes: str | None
    excluded_attributes: str | None
    # None: index paging. "": first page of cursor paging. Otherwise an opaque cursor.
    cursor: str | None


_MAX_START_INDEX = 2**63


def _int(raw: Any, name: str) -> int:
    if isinstance(raw, bool):
        raise invalid_value(f"{name} must be an integer")
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise invalid_value(f"{name} must be an integer") from None


def _names(raw: Any, name: str) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        return ",".join(raw)
    if isinstance(raw, str):
        return raw
    raise invalid_value(f"{name} must be a list of attribute names")


def parse_list_query(params: Mapping[str, Any], max_results: int) -> ListQuery:
    """Read the paging, sorting, filtering and projection parameters; names are case-insensitive."""
    p = {k.lower(): v for k, v in params.items()}
    raw_filter = p.get("filter")
    if raw_filter is not None and not isinstance(raw_filter, str):
        raise ScimError(400, "filter must be a string", "invalidFilter")
    cursor = p.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise ScimError(400, "cursor must be a string", "invalidCursor")
    if cursor is not None and p.get("startindex") is not None:
        raise invalid_value("startIndex and cursor cannot be used together")
    # Past the last result is an empty page, however far: OFFSET is a bigint.
    start_index = min(max(1, _int(p.get("startindex", 1), "startIndex")), _MAX_START_INDEX)
    # RFC 7644: a negative count is interpreted as 0; an absent one is the server's choice.
    count = min(max(0, _int(p.get("count", max_results), "count")), max_results)
    order = p.get("sortorder")
    if order is not None and (
        not isinstance(order, str) or order.lower() not in ("ascending", "descending")
    ):
        raise invalid_value("sortOrder must be ascending or descending")
    sort_by = p.get("sortby")
    if sort_by is not None and not isinstance(sort_by, str):
        raise invalid_value("sortBy must be an attribute name")
    if cursor is not None and sort_by:
        raise invalid_value("sortBy cannot be combined with cursor pagination")
    return ListQuery(
        filter=raw_filter or None,
        start_index=start_index,
        count=count,
        sort_by=sort_by or None,
        descending=bool(order and order.lower() == "descending"),
        attributes=_names(p.get("attributes"), "attributes"),
        excluded_attributes=_names(p.get("excludedattributes"), "excludedAttributes"),
        cursor=cursor,
    )


def search_params(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid_syntax("A SearchRequest must be a JSON object")
    return {k: v for k, v in body.items() if k != "schemas"}


def encode_cursor(created: datetime, resource_id: str) -> str:
    raw = orjson.dumps([created.isoformat(), resource_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, resource_id = orjson.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(created, str) or not isinstance(resource_id, str):
            raise TypeError("a cursor is two strings")  # UUID([]) raises AttributeError
        when = datetime.fromisoformat(created)
        # In UTC, as the column is; a forged one may fall outside the calendar there.
        when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
        return when, UUID(resource_id)
    except (ValueError, TypeError, OverflowError, binascii.Error, orjson.JSONDecodeError):
        raise ScimError(400, "The cursor is not valid", "invalidCursor") from None


def list_response(
    resources: list[dict[str, Any]],
    total: int,
    query: ListQuery,
    next_cursor: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schemas": [LIST_RESPONSE],
        "totalResults": total,
        "itemsPerPage": len(resources),
    }
    if query.cursor is None:
        body["startIndex"] = query.start_index
    elif next_cursor is not None:
        body["nextCursor"] = next_cursor
    body["Resources"] = resources
    return body


@dataclass(frozen=True, slots=True)
class View:
    """A resource view that lists page through: its table, row alias and filter compilers."""

    table: str
    alias: str
    columns: str  # comma-separated, unqualified
    # Both also take the tenant's declared extensions (service.scim.declared.Declared).
    filter_sql: Callable[[str, SqlParams, Any], str]
    sort_sql: Callable[[str, Any], str]


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[Any]
    total: int
    next_cursor: str | None = None


def tenant_where(
    view: View,
    tenant_id: UUID,
    expression: str | None,
    params: SqlParams,
    declared: Mapping[str, Any] | None = None,
) -> str:
    """The WHERE of a tenant's rows that match a filter; the tenant is `$1` of `params`."""
    a = view.alias
    where = f"{a}.tenant_id = $1"
    if expression:
        where += f" AND ({view.filter_sql(expression, params, declared)})"
        if declared and unique_attributes(dict(declared)):
            # A declared unique attribute's index is partial on the tenant (infra/schemas.py):
            # a cached generic plan can use it only when the tenant is a constant of the
            # statement. The id is ours (a UUID), never a client's text.
            where += f" AND {a}.tenant_id = '{UUID(str(tenant_id))}'::uuid"
    return where


async def fetch_page(
    pool: asyncpg.Pool,
    view: View,
    tenant_id: UUID,
    query: ListQuery,
    extra: str | None = None,
    declared: Mapping[str, Any] | None = None,
) -> Page:
    """One page of a tenant's resources: index paging (OFFSET, any sortBy) or RFC 9865
    cursors (keyset on created, id). Every value reaches SQL as a parameter.

    `extra`: a SQL expression over the page's row `p` (e.g. a correlated subquery), selected
    as the column `extra` in the same round trip, computed for the page's rows only.
    """
    a = view.alias
    params = SqlParams([tenant_id])
    where = tenant_where(view, tenant_id, query.filter, params, declared)
    count_args = list(params.values)  # the count query takes the filter's parameters only
    count_sql = f"SELECT count(*) FROM {view.table} {a} WHERE {where}"
    if query.count == 0:
        return Page([], int(await pool.fetchval(count_sql, *count_args)))
    columns = ", ".join(f"{a}.{c.strip()}" for c in view.columns.split(","))
    if query.cursor is not None:
        if query.cursor:
            created, last_id = decode_cursor(query.cursor)
            after = f"({params.add(created)}, {params.add(last_id)})"
            where += f" AND ({a}.created, {a}.id) > {after}"
        rows = list(
            await pool.fetch(
                _with_extra(
                    f"SELECT {columns} FROM {view.table} {a} WHERE {where}"
                    f" ORDER BY {a}.created, {a}.id LIMIT {params.add(query.count + 1)}",
                    extra,
                ),
                *params.values,
            )
        )
        next_cursor = None
        if len(rows) > query.count:
            rows = rows[: query.count]
            next_cursor = encode_cursor(rows[-1]["created"], str(rows[-1]["id"]))
        return Page(rows, int(await pool.fetchval(count_sql, *count_args)), next_cursor)
    if query.sort_by:
        direction = "DESC" if query.descending else "ASC"
        order = (
            f"{view.sort_sql(query.sort_by, declared)} {direction} NULLS LAST, {a}.id {direction}"
        )
    else:
        order = f"{a}.created, {a}.id"
    rows = list(
        await pool.fetch(
            _with_extra(
                f"SELECT {columns}, count(*) OVER () AS total FROM {view.table} {a} WHERE {where}"
                f" ORDER BY {order} OFFSET {params.add(query.start_index - 1)}"
                f" LIMIT {params.add(query.count)}",
                extra,
            ),
            *params.values,
        )
    )
    total = rows[0]["total"] if rows else await pool.fetchval(count_sql, *count_args)
    return Page(rows, int(total))


def _with_extra(page_sql: str, extra: str | None) -> str:
    # The page is a subquery, so `extra` runs once per row of the page, in the page's order
    # (a plain scan of a subquery keeps its ORDER BY), never for the rows the page skipped.
    if extra is None:
        return page_sql
    return f"SELECT p.*, {extra} AS extra FROM ({page_sql}) p"
