"""Provisioning-log exports: the pages one request returns, and the one writer behind the API's,
the web page's and the CLI's exports (they differ only in where the bytes go).

One request returns at most `SCIMLEDGER_MAX_EXPORT_ENTRIES` entries (and stops starting new
ones past `SCIMLEDGER_MAX_EXPORT_BYTES` of their stored values); the rest is named by a page
token, as the API's `next`: the reply's `Link: <...>; rel="next"`. A continued page carries no
CSV header, so the pages one after the other are the whole file; the CLI and the web page
follow the pages into one file.

CSV cells are neutralised for spreadsheets (OWASP's CSV injection rule): a cell that begins
with `=`, `+`, `-`, `@`, a tab or a carriage return is prefixed with a single quote, so a
userName such as `=HYPERLINK(…)` is shown as text, never evaluated as a formula. JSON lines
carry the values as they are: they are data, not cells.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from asyncpg import Pool

from infra import audit_sealing, collector
from infra.eventstore import Conn
from service import audit_queries as q

FORMATS = ("csv", "jsonl")
CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}

CSV_COLUMNS = (
    "id",
    "activityDateTime",
    "changeId",
    "clientRequestId",
    "provisioningAction",
    "status",
    "errorCode",
    "reason",
    "targetType",
    "targetId",
    "targetDisplayName",
    "sourceId",
    "initiatedBy",
    "method",
    "path",
    "httpStatus",
    "durationInMilliseconds",
    "modifiedProperties",
)

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: Any) -> Any:
    """A cell a spreadsheet shows as text: strings that would start a formula get a quote."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def csv_row(entry: Mapping[str, Any]) -> list[Any]:
    """An entry (audit_queries.entry_json) as the cells of CSV_COLUMNS, neutralised."""
    error = entry["provisioningStatusInfo"]["errorInformation"] or {}
    target = entry["targetIdentity"]
    cells = [
        entry["id"],
        entry["activityDateTime"],
        entry["changeId"],
        entry["clientRequestId"],
        entry["provisioningAction"],
        entry["provisioningStatusInfo"]["status"],
        error.get("errorCode"),
        error.get("reason"),
        target["identityType"],
        target["id"],
        target["displayName"],
        entry["sourceIdentity"]["id"],
        entry["initiatedBy"]["displayName"],
        entry["request"]["method"],
        entry["request"]["path"],
        entry["request"]["status"],
        entry["durationInMilliseconds"],
        orjson.dumps(entry["modifiedProperties"]).decode(),
    ]
    return [neutralise(cell) for cell in cells]


def csv_line(entry: Mapping[str, Any]) -> str:
    """An entry as one CSV record (RFC 4180, as the csv module's default dialect writes it:
    a cell is quoted when it holds a comma, a quote or a line break, its quotes doubled), built
    with str methods: the csv module's writer cost more than all the rest of an entry."""
    return ",".join([_cell(cell) for cell in csv_row(entry)]) + "\r\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if type(value) is not str:
        return str(value)
    if '"' in value:
        return '"' + value.replace('"', '""') + '"'
    if "," in value or "\n" in value or "\r" in value:
        return '"' + value + '"'
    return value


class ExportWriter:
    """Entries in, bytes out: `add` entries, `take` the bytes written since the last take.
    CSV starts with its header row, unless it continues a file (`header=False`: an export's
    later pages)."""

    def __init__(self, fmt: str, *, header: bool = True) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self._lines: list[str] = []
        self._records: list[bytes] = []
        self.entries = 0  # added in all
        if fmt == "csv" and header:
            self._lines.append(",".join(CSV_COLUMNS) + "\r\n")

    def add(self, entry: Mapping[str, Any]) -> None:
        self.entries += 1
        if self.fmt == "csv":
            self._lines.append(csv_line(entry))
        else:
            self._records.append(orjson.dumps(entry) + b"\n")

    def take(self) -> bytes:
        """The bytes written since the last take (b"" if none)."""
        data = "".join(self._lines).encode() + b"".join(self._records)
        self._lines.clear()
        self._records.clear()
        return data


# -- pages --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportPage:
    """What one export request returns: the selected entries after `after` (exclusive) down
    to `last` (inclusive; None: none), and the token of the rest (None: it is the last page)."""

    after: tuple[datetime, int] | None
    last: tuple[datetime, int] | None
    next_token: str | None


# Rows an export reads and formats at a time (in a connection acquisition of its own, from a
# pool): ~10 ms of CPU between two waits of the event loop. Bytes handed on to a client at a time.
_EXPORT_CHUNK, _WRITE_BYTES = 500, 256 * 1024
# What an entry costs an export, in stored bytes: its values (sealed, or in clear) and reason.
_ENTRY_BYTES = (
    "coalesce(octet_length(sealed), 0) + coalesce(octet_length(error_reason), 0)"
    " + coalesce(pg_column_size(modified_properties), 0)"
)


async def export_page(
    conn: Conn | Pool,
    tenant_id: UUID,
    where: q.AuditFilter,
    next_token: str | None,
    max_entries: int,
    max_bytes: int,
) -> ExportPage:
    """Where one export request ends (raises BadQuery for a token that is not one): at most
    `max_entries` entries, and none that starts past `max_bytes` of stored values (a first
    entry always fits). Decided before the reply starts, so that its headers name the next
    page; one query over the keys and sizes of at most max_entries + 1 rows. The next page
    starts after this page's last entry, as the API's `next` does: entries the log gains
    meanwhile are newer and belong to no later page, none is repeated or skipped."""
    after = await q.resolve_next(conn, tenant_id, next_token) if next_token else None
    sql, args = where.where(tenant_id)
    if after is not None:
        args += list(after)
        sql += f" AND (activity_at, entry_position) < (${len(args) - 1}, ${len(args)})"
    args += [max(1, max_entries) + 1, max(1, max_entries), max_bytes]
    read, cap, budget = (f"${len(args) - k}" for k in (2, 1, 0))
    found = await q.fetch_selected(
        conn,
        where,
        "SELECT id, activity_at, transaction_id, entry_position, n, scanned FROM ("
        "  SELECT e.*, row_number() OVER w AS n, count(*) OVER () AS scanned,"
        "         sum(size) OVER w - size AS before"
        f"  FROM (SELECT id, activity_at, transaction_id, entry_position, {_ENTRY_BYTES} AS size"
        f"        FROM audit_entries WHERE {sql}"
        f"        ORDER BY activity_at DESC, entry_position DESC LIMIT {read}) e"
        "  WINDOW w AS (ORDER BY activity_at DESC, entry_position DESC ROWS UNBOUNDED PRECEDING)"
        f") s WHERE n <= {cap} AND (n = 1 OR before < {budget}) ORDER BY n DESC LIMIT 1",
        args,
    )
    row = found[0] if found else None
    if row is None:
        return ExportPage(after, None, None)
    more = row["scanned"] > row["n"]
    return ExportPage(
        after, (row["activity_at"], row["entry_position"]), q.encode_next(row) if more else None
    )


async def export_chunks(
    source: Conn | Pool, tenant_id: UUID, where: q.AuditFilter, page: ExportPage, out: ExportWriter
) -> AsyncIterator[bytes]:
    """The export file's bytes for the entries of a page, newest first, through `out` (which
    may go on from an earlier page: the CLI's one file): rows read _EXPORT_CHUNK at a time by
    keyset (constant memory), the bytes given in pieces of at most _WRITE_BYTES.

    Each chunk of rows is read and formatted with the cyclic collector held off
    (infra.collector), and only its bytes are left when it is back: its thousands of dicts,
    alive until the chunk is formatted, would otherwise be promoted to the collector's oldest
    generation and set off full collections of the whole heap (in `make fuzz`, 90% of an
    export request's CPU). The collector is back while the bytes wait for the client. From a
    pool, each chunk is read in a connection acquisition of its own, so a client that reads
    slowly holds no connection."""
    if page.last is None:
        if data := out.take():  # a CSV header for an empty export
            yield data
        return
    sql, args = where.where(tenant_id)
    args += list(page.last)
    sql += f" AND (activity_at, entry_position) >= (${len(args) - 1}, ${len(args)})"
    after = page.after
    while True:
        with collector.paused():
            rows = await q.select_rows(source, tenant_id, where, _EXPORT_CHUNK, after, (sql, args))
            events = await q.stored_events(source, tenant_id, rows)
            for row in await audit_sealing.open_entries(source, rows):
                out.add(q.entry_json(row, events))
            data = out.take()
            more = len(rows) == _EXPORT_CHUNK
            after = (rows[-1]["activity_at"], rows[-1]["entry_position"]) if more else None
            del rows, events
        view = memoryview(data)
        for start in range(0, len(view), _WRITE_BYTES):
            yield bytes(view[start : start + _WRITE_BYTES])
        if not more:
            return


async def whole_export(
    source: Conn | Pool,
    tenant_id: UUID,
    where: q.AuditFilter,
    out: ExportWriter,
    max_entries: int,
    max_bytes: int,
) -> AsyncIterator[bytes]:
    """The file of every selected entry, newest first, through `out`: the export's pages one
    after the other, each continued from the one before (the CLI's export, one file)."""
    token = None
    while True:
        page = await export_page(source, tenant_id, where, token, max_entries, max_bytes)
        async for data in export_chunks(source, tenant_id, where, page, out):
            yield data
        if page.next_token is None:
            return
        token = page.next_token
