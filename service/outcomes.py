"""Every SCIM write request answered for: the RequestRecorded event behind its audit entry.

A request that changes something records its outcome in the unit of work, with its domain
events. For the others (nothing changed, or an error), this middleware appends the outcome in
a transaction of its own once the reply is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import orjson
import structlog
from aiohttp import web

from domain.errors import bounded
from domain.request import ProvisioningRequest
from infra import metrics
from infra.database import Database
from infra.detail_sealing import seal_error
from infra.eventstore import ConcurrencyError
from infra.tenants import authenticate_many
from service.state import (
    CLIENT_REQUEST_ID,
    DATABASE,
    PRINCIPAL,
    RELAYED_CLIENT,
    REQUEST_CONTEXT,
    REQUEST_ID,
    SETTINGS,
    UNVERIFIED_TOKEN,
    Handler,
)

log = structlog.get_logger("scimledger.audit")
_UNCHECKED = UUID(int=0)
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
    # The subject a failure's detail quotes, when not the target (a 409's holder).
    error_subject: UUID | None = None

    def subject(self) -> UUID | None:
        """The user or group whose key seals a failure's detail (infra.detail_sealing)."""
        if self.error_subject is not None:
            return self.error_subject
        if self.target_type not in ("User", "Group") or not self.target_id:
            return None
        try:
            return UUID(self.target_id)
        except ValueError:
            return None

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
    return {k: _safe(v) if isinstance(v, str) else v for k, v in fields.items()}


def _safe(text: str) -> str:
    if text.isascii() and "\x00" not in text:  # the usual: nothing to replace
        return bounded(text)
    return bounded(text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8"))


def is_audited(request: web.Request) -> bool:
    """Writes always; reads (GET, .search) only when SCIMLEDGER_AUDIT_READS is on."""
    if not request.path.startswith("/scim/v2/"):
        return False
    if request.method in WRITE_METHODS and not request.path.endswith("/.search"):
        return True
    return bool(request.app[SETTINGS].audit_reads) and request.method in ("GET", "POST")


def context_for(request: web.Request) -> RequestContext:
    principal = request.get(PRINCIPAL)
    parts = request.path.removeprefix("/scim/v2/").split("/")
    target_type = {"Users": "User", "Groups": "Group"}.get(parts[0])
    return RequestContext(
        request_id=request[REQUEST_ID],
        # No principal: its token could not be checked yet (QueuedOutcome checks it later).
        tenant_id=principal.tenant_id if principal else _UNCHECKED,
        method=request.method,
        path=request.path,
        initiated_by=principal.token_name if principal else "",
        client=request.get(RELAYED_CLIENT, request.remote),
        target_type=target_type,
        target_id=parts[1] if len(parts) > 1 and parts[1] else None,
        client_request_id=request.get(CLIENT_REQUEST_ID),
    )


@web.middleware
async def record_outcomes(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    context = request.get(REQUEST_CONTEXT)
    unverified = request.get(UNVERIFIED_TOKEN)
    if context is None and unverified is not None and is_audited(request):
        # The token could not be checked (the database away): the entry waits for the check.
        context = context_for(request)
    elif context is None or context.recorded or not is_audited(request):
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
    queued = QueuedOutcome(
        uuid.uuid4(),
        None if context.tenant_id == _UNCHECKED else context.tenant_id,
        unverified if context.tenant_id == _UNCHECKED else None,
        outcome,
        context.describe(status),
        error,
        context.request_id,
        context.subject() if error is not None else None,
    )
    pending = request.app[PENDING_OUTCOMES]
    database = request.app[DATABASE]
    if len(pending) == 0 and queued.tenant_id is not None:
        try:
            await queued.write(database)
            return response
        except Exception as e:  # the reply stands; its record waits for the database
            log.warning(
                "could not record request outcome; queued",
                error=type(e).__name__,
                request_id=context.request_id,
            )
    pending.put(database, queued)
    return response


@dataclass(slots=True)
class QueuedOutcome:
    """A request's provisioning-log record, as it waits in memory for the database. Its id is
    drawn once: an attempt whose reply was lost but which committed is not written twice (the
    retry collides on the record's stream, a ConcurrencyError)."""

    record_id: UUID
    tenant_id: UUID | None  # None: the token is still to be checked (`token_digest`)
    token_digest: bytes | None  # never the token itself
    outcome: str
    described: dict[str, Any]
    error: dict[str, Any] | None
    request_id: str
    subject: UUID | None = None  # whose key seals the error's detail

    async def write(self, database: Database) -> None:
        tenant_id = self.tenant_id
        if tenant_id is None:
            assert self.token_digest is not None
            found = await authenticate_many(database.pool, [self.token_digest])
            principal = found.get(self.token_digest)
            if principal is None or principal.role != "provisioning":
                return  # a token that would have been refused: a 401/403, never recorded
            tenant_id = principal.tenant_id
            self.described["initiatedBy"] = principal.token_name
        error = self.error
        if error is not None and self.subject is not None:
            keys = database.store.keys
            error = await seal_error(database.pool, keys, self.record_id, self.subject, error)
        record = ProvisioningRequest.record(
            self.record_id, tenant_id, self.outcome, self.described, error
        )
        try:
            await database.store.append_now(tenant_id, record.collect_events(), self.request_id)
        except ConcurrencyError:
            pass  # written already: the first attempt committed after all


class PendingOutcomes:
    """Outcomes that could not be written when their request was answered (the database gone
    in a failover, or restarting): kept in memory, in order, and written by one background
    task once the database answers again, so the provisioning log stays complete. While some
    wait, later outcomes queue behind them (the log keeps the order of the replies).

    Bounded: past `limit` queued records the oldest is dropped and counted
    (scimledger_outcomes_dropped_total in /metrics), as are the ones still queued when the
    process stops.
    """

    def __init__(self, limit: int, retry_interval: float = 0.5) -> None:
        self.limit = max(limit, 0)
        self.retry_interval = retry_interval
        self._queue: deque[tuple[Database, QueuedOutcome]] = deque()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, database: Database, queued: QueuedOutcome) -> None:
        metrics.OUTCOMES_QUEUED.inc()
        if len(self._queue) >= self.limit:
            metrics.OUTCOMES_DROPPED.inc()
            if not self._queue:
                return
            _, dropped = self._queue.popleft()
            log.warning("queued request outcome dropped: queue full", request_id=dropped.request_id)
        self._queue.append((database, queued))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue:
            database, queued = self._queue[0]
            try:
                await queued.write(database)
            except Exception as e:  # the database is not back yet
                log.info(
                    "request outcomes still queued", count=len(self._queue), error=type(e).__name__
                )
                await asyncio.sleep(self.retry_interval)
                continue
            if self._queue and self._queue[0][1] is queued:
                self._queue.popleft()
        log.info("queued request outcomes written")

    async def close(self, grace: float = 2.0) -> None:
        """At shutdown: a last chance to write what is queued; the rest is counted as dropped."""
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), grace)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue:
            metrics.OUTCOMES_DROPPED.inc(len(self._queue))
            log.warning("request outcomes lost at shutdown", count=len(self._queue))
            self._queue.clear()


PENDING_OUTCOMES = web.AppKey("pending_outcomes", PendingOutcomes)
