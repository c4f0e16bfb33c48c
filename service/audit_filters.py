"""What a compliance officer asks the audit pages for: the filter form's values, as the form
shows them and as the provisioning-log query takes them (service.audit_queries.AuditFilter)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode
from uuid import UUID

from service import audit_queries as q
from service.boundary import in_utc

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

    def pinned(self, where: q.AuditFilter) -> Filters:
        """These filters with a relative date range ("last 7 days") as the dates it meant
        when `where` was made from them: what the next page of an export is asked with."""
        if RANGES[self.values["range"]][1] is None or where.since is None:
            return self
        since = where.since.isoformat()
        return Filters({**self.values, "range": "custom", "from": since}, self.limit, None)

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


def local_input(raw: str) -> str:
    """A custom date as a datetime-local input shows it (UTC), or '' if it is not one."""
    try:
        moment = _moment(raw, "")
    except q.BadQuery:
        return ""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") if moment else ""
