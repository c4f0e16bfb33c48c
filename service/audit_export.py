"""Provisioning-log entries as export files: the one writer behind the API's, the web page's and
the CLI's exports (they differ only in where the bytes go).

CSV cells are neutralised for spreadsheets (OWASP's CSV injection rule): a cell that begins
with `=`, `+`, `-`, `@`, a tab or a carriage return is prefixed with a single quote, so a
userName such as `=HYPERLINK(…)` is shown as text, never evaluated as a formula. JSON lines
carry the values as they are: they are data, not cells.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

import orjson

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
# A chunk is written out past either bound: a few hundred KB per write to the client.
_CHUNK_LINES, _CHUNK_CHARS = 500, 256_000


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


class ExportWriter:
    """Entries in, bytes out, a chunk at a time: `add` each entry, `take` the bytes when
    `full` (and once at the end). CSV starts with its header row."""

    def __init__(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self._text = io.StringIO()
        self._csv = csv.writer(self._text)
        self._lines: list[bytes] = []
        if fmt == "csv":
            self._csv.writerow(CSV_COLUMNS)

    def add(self, entry: Mapping[str, Any]) -> None:
        if self.fmt == "csv":
            self._csv.writerow(csv_row(entry))
        else:
            self._lines.append(orjson.dumps(entry) + b"\n")

    @property
    def full(self) -> bool:
        return len(self._lines) >= _CHUNK_LINES or self._text.tell() > _CHUNK_CHARS

    def take(self) -> bytes:
        """The bytes written since the last take (b"" if none)."""
        data = self._text.getvalue().encode() + b"".join(self._lines)
        self._text.seek(0)
        self._text.truncate()
        self._lines.clear()
        return data


async def chunks(entries: AsyncIterable[Mapping[str, Any]], fmt: str) -> AsyncIterator[bytes]:
    """The export file of `entries` in `fmt`, a few hundred KB at a time (never empty): what
    the API, the web page and the CLI send on, each to its own sink."""
    out = ExportWriter(fmt)
    async for entry in entries:
        out.add(entry)
        if out.full:
            yield out.take()
    if data := out.take():
        yield data
