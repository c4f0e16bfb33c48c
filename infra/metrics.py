"""The service's Prometheus metrics, one set per process.

Defined here, below every layer that counts something, so the event store, the projection
runners and the HTTP layer count into the same objects; `service/metrics.py` serves them at
GET /metrics. Labels hold route templates, methods, statuses and projection names only:
never an id, a userName, a tenant or a token.

Under `serve --workers N` the parent sets PROMETHEUS_MULTIPROC_DIR before starting the
workers, and prometheus-client keeps these values in files there; a scrape reaching any worker
then reports the whole server (see service/metrics.py).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

REQUESTS = Counter(
    "scimledger_http_requests",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
)
REQUEST_SECONDS = Histogram(
    "scimledger_http_request_duration_seconds",
    "Time from a request's arrival to its response, by method and route template.",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
APPENDS = Counter(
    "scimledger_appends", "Appends to the event store (one INSERT of one transaction's events)."
)
EVENTS_APPENDED = Counter("scimledger_events_appended", "Events appended to the event store.")
APPEND_SECONDS = Histogram(
    "scimledger_append_duration_seconds",
    "Time of one append (the INSERT; the commit is part of the request's time).",
    buckets=_LATENCY_BUCKETS,
)
CONFLICTS = Counter(
    "scimledger_version_conflicts",
    # version: another append to the stream came first; order: the stream's previous version
    # came from a newer transaction (retried, see infra.eventstore.OutOfOrder); deadlock.
    "Writes that lost a race: version, order or deadlock.",
    ["kind"],
)
RETRIES = Counter(
    "scimledger_write_retries", "Writes retried from a fresh load after losing a race."
)
CONFLICT_ANSWERS = Counter(
    "scimledger_write_conflict_answers",
    "Writes that lost a race and were answered 412 (the client sent If-Match) or 409 (lost"
    " every retry). A stale If-Match seen at load is a plain 412 in the request counter.",
    ["status"],
)
PROJECTION_APPLIED = Counter(
    "scimledger_projection_events_applied",
    "Events applied by this process's runner of an asynchronous projection.",
    ["projection"],
)
RUNNER_ACTIVE = Gauge(
    "scimledger_projection_runner_active",
    "1 while this process's runner leads the projection (one leader across all instances).",
    ["projection"],
    multiprocess_mode="livesum",
)
POOL_SIZE = Gauge(
    "scimledger_db_pool_connections",
    "Connections open in the database pool.",
    multiprocess_mode="livesum",
)
POOL_IN_USE = Gauge(
    "scimledger_db_pool_connections_in_use",
    "Pool connections borrowed by requests or tasks.",
    multiprocess_mode="livesum",
)
POOL_MAX = Gauge(
    "scimledger_db_pool_max_connections",
    "Upper bound of the database pool (SCIMLEDGER_POOL_MAX).",
    multiprocess_mode="livesum",
)
OUTCOMES_QUEUED = Counter(
    "scimledger_outcomes_queued",
    "Request outcomes (provisioning-log records) that could not be written when answered, and"
    " were queued in memory to be written once the database is back.",
)
OUTCOMES_DROPPED = Counter(
    "scimledger_outcomes_dropped",
    "Queued request outcomes dropped: the queue was full (SCIMLEDGER_MAX_QUEUED_OUTCOMES) or"
    " the process stopped before the database came back. Each is a gap in the provisioning log.",
)
BULK_HANDOFFS = Counter(
    "scimledger_bulk_handoffs",
    "Client connections a front handed to the bulk process, by when: at accept, before reading"
    " a byte (a large body first on its connection), or within a request (after its head and"
    " first segments: a large body later on a kept-alive connection, or a heavy token's).",
    ["at"],
)
