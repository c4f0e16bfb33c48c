"""Every SCIM write request answered for: the RequestRecorded event behind its audit entry.

A request that changes something records its outcome in the unit of work, with its domain
events. For the others (nothing changed, or an error), this middleware appends the outcome in
a transaction of its own once the reply is known.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import orjson
import structlog
from aiohttp import web

from domain.errors import bounded
from domain.request import ProvisioningRequest
from service.state import (
    CLIENT_REQUEST_ID,
    DATABASE,
    PRINCIPAL,
    REQUEST_CONTEXT,
    REQUEST_ID,
    SETTINGS,
    Handler,
)

log = structlog.get_logger("scimledger.audit")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class RequestContext:
    """What the audit entry says of the request itself."""

    request_id: str
    tenant_id: UUID
    method: str
    path: str
    initiated_by: str
    client: str | None
    target_type: str | None
    target_id: str | None
    client_request_id: str | None = None
    started: float = field(default_factory=time.perf_counter)
    # Set by the unit of work when it committed domain events with the outcome.
    recorded: bool = False

    def describe(self, status: int) -> dict[str, Any]:
        return _text_safe(
            {
                "method": self.method,
                "path": self.path,
                "status": status,
                "initiatedBy": self.initiated_by,
                "client": self.client,
                "targetType": self.target_type,
                "targetId": self.target_id,
                "clientRequestId": self.client_request_id,
                "durationMs": round((time.perf_counter() - self.started) * 1000, 3),
            }
        )

    def success_status(self, query: Any = None) -> int:
        if self.method == "POST":
            return 201
        if self.method == "DELETE" or (self.method == "PATCH" and self.target_type == "Group"):
            return 204
        return 200


def _text_safe(fields: dict[str, Any]) -> dict[str, Any]:
    """Strings PostgreSQL text can hold: a path or an error detail may echo a client's NUL
    (`/Users/%00`), which would stop the audit projection at this record. (Unpaired
    surrogates, which orjson refuses to write, are replaced too.) And bounded: the record is
    kept forever, and an error detail may quote a client's input at any length."""
    return {
        k: bounded(v.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8"))
        if isinstance(v, str)
        else v
        for k, v in fields.items()
    }


def is_audited(request: web.Request) -> bool:
    """Writes always; reads (GET, .search) only when SCIMLEDGER_AUDIT_READS is on."""
    if not request.path.startswith("/scim/v2/"):
        return False
    if request.method in WRITE_METHODS and not request.path.endswith("/.search"):
        return True
    return bool(request.app[SETTINGS].audit_reads) and request.method in ("GET", "POST")


def context_for(request: web.Request) -> RequestContext:
    principal = request[PRINCIPAL]
    parts = request.path.removeprefix("/scim/v2/").split("/")
    target_type = {"Users": "User", "Groups": "Group"}.get(parts[0])
    return RequestContext(
        request_id=request[REQUEST_ID],
        tenant_id=principal.tenant_id,
        method=request.method,
        path=request.path,
        initiated_by=principal.token_name,
        client=request.remote,
        target_type=target_type,
        target_id=parts[1] if len(parts) > 1 and parts[1] else None,
        client_request_id=request.get(CLIENT_REQUEST_ID),
    )


@web.middleware
async def record_outcomes(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    context = request.get(REQUEST_CONTEXT)
    if context is None or context.recorded or not is_audited(request):
        return response
    status = response.status
    error = None
    if status >= 400:
        outcome = "failure"
        body = getattr(response, "body", None)
        try:
            parsed = orjson.loads(body) if isinstance(body, bytes | bytearray) else {}
        except orjson.JSONDecodeError:
            parsed = {}
        error = {k: parsed.get(k) for k in ("status", "scimType", "detail")}
        error["status"] = error["status"] or str(status)
        error = _text_safe(error)
    elif request.method in WRITE_METHODS and not request.path.endswith("/.search"):
        outcome = "skipped"
    else:
        outcome = "success"  # an audited read
    record = ProvisioningRequest.record(
        uuid.uuid4(), context.tenant_id, outcome, context.describe(status), error
    )
    try:
        await request.app[DATABASE].store.append_now(
            context.tenant_id, record.collect_events(), context.request_id
        )
    except Exception as e:  # the reply stands; only its audit record is lost
        log.warning(
            "could not record request outcome",
            error=type(e).__name__,
            request_id=context.request_id,
        )
    return response
