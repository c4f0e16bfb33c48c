"""Where the service finds its database and how it listens: flags, environment, defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("SCIMLEDGER_DATA_DIR", "var"))
    )
    database_url: str | None = field(default_factory=lambda: os.environ.get("DATABASE_URL") or None)
    host: str = field(default_factory=lambda: os.environ.get("SCIMLEDGER_HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: _int_env("SCIMLEDGER_PORT", 8000))
    pool_min: int = field(default_factory=lambda: _int_env("SCIMLEDGER_POOL_MIN", 2))
    pool_max: int = field(default_factory=lambda: _int_env("SCIMLEDGER_POOL_MAX", 20))
    # Entra pages through users; a cap keeps one request from pulling a whole tenant.
    max_results: int = field(default_factory=lambda: _int_env("SCIMLEDGER_MAX_RESULTS", 1000))
    max_body_bytes: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_MAX_BODY_BYTES", 2 * 1024 * 1024)
    )
    # PATCH limits, far above what Entra sends (member adds in batches of a few hundred).
    max_patch_operations: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_MAX_PATCH_OPERATIONS", 1000)
    )
    max_patch_members: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_MAX_PATCH_MEMBERS", 10000)
    )
    # Values of one multi-valued User attribute (emails, roles, x509Certificates, ...) and
    # characters of one string in a body: Entra sends a handful of values, strings of a few KB
    # (an x509 certificate) at most. They bound what one request, and a stored user, can cost.
    max_multi_values: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_MAX_MULTI_VALUES", 1000)
    )
    max_string_length: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_MAX_STRING_LENGTH", 65536)
    )
    # Requests per second per token (a token bucket of `rate_limit_burst`); 0 turns it off.
    # Entra sends at most about 25 requests/s per tenant.
    rate_limit: float = field(default_factory=lambda: _float_env("SCIMLEDGER_RATE_LIMIT", 100.0))
    rate_limit_burst: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_RATE_LIMIT_BURST", 200)
    )
    # Seconds: to open a database connection, and (in `serve`) for one statement to answer.
    # A stopped or unreachable database then gives 503 instead of a request that hangs.
    db_connect_timeout: float = field(
        default_factory=lambda: _float_env("SCIMLEDGER_DB_CONNECT_TIMEOUT", 5.0)
    )
    db_command_timeout: float = field(
        default_factory=lambda: _float_env("SCIMLEDGER_DB_COMMAND_TIMEOUT", 30.0)
    )
    # Run the asynchronous projections' catch-up subscribers in this process.
    run_projections: bool = field(
        default_factory=lambda: os.environ.get("SCIMLEDGER_RUN_PROJECTIONS", "1") != "0"
    )
    # Also record reads (GET and .search) in the provisioning log; writes always are.
    audit_reads: bool = field(
        default_factory=lambda: os.environ.get("SCIMLEDGER_AUDIT_READS", "0") == "1"
    )
    # Base URL that Entra is told to use; None means "derive from the request".
    public_url: str | None = field(default_factory=lambda: os.environ.get("SCIMLEDGER_PUBLIC_URL"))
    # asyncpg's prepared-statement cache; 0 for PgBouncer in transaction mode (docs/operations.md).
    statement_cache_size: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_STATEMENT_CACHE_SIZE", 100)
    )
    # A session-mode (direct, not transaction-pooled) URL for what needs a session of its own:
    # the projection runners' leadership lock and LISTEN, and the migrations' lock.
    direct_database_url: str | None = field(
        default_factory=lambda: os.environ.get("SCIMLEDGER_DIRECT_DATABASE_URL") or None
    )
    # How often a standby projection runner retries for the lead (seconds).
    runner_standby_interval: float = field(
        default_factory=lambda: float(os.environ.get("SCIMLEDGER_RUNNER_STANDBY_INTERVAL", "1"))
    )
    # GET /metrics (Prometheus text format, no token); 0 turns the endpoint off.
    # Request outcomes (provisioning-log records) held in memory while the database is away
    # (a failover): written once it is back; past this many the oldest are dropped (counted).
    max_queued_outcomes: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_MAX_QUEUED_OUTCOMES", 10000)
    )
    metrics: bool = field(default_factory=lambda: os.environ.get("SCIMLEDGER_METRICS", "1") != "0")
    # POST /Users of concurrent requests appended in one transaction (service/group_commit.py);
    # 0: each request in its own.
    group_commit: bool = field(
        default_factory=lambda: os.environ.get("SCIMLEDGER_GROUP_COMMIT", "1") != "0"
    )
    # Events one audit time-travel request (`/audit/v1/resources/{id}?at=`) may replay.
    max_replay_events: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_MAX_REPLAY_EVENTS", 10000)
    )
    # One audit export request's entries, and the stored bytes of their values it starts
    # entries within: past either the reply ends with a `Link: <...>; rel="next"` to the rest
    # (service/audit_queries.export_page). They keep one export request's CPU far below 1 s.
    max_export_entries: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_MAX_EXPORT_ENTRIES", 5000)
    )
    max_export_bytes: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_MAX_EXPORT_BYTES", 8 * 1024 * 1024)
    )
    # Seconds `serve` waits for in-flight requests on SIGTERM before it cuts them off.
    shutdown_timeout: float = field(
        default_factory=lambda: float(os.environ.get("SCIMLEDGER_SHUTDOWN_TIMEOUT", "30"))
    )
    # Seconds one write of a streamed reply (a group's members, an audit export) may wait for a
    # slow client; past it the reply is cut and the connection closed. No database connection
    # is held while a stream waits on its client.
    slow_client_timeout: float = field(
        default_factory=lambda: _float_env("SCIMLEDGER_SLOW_CLIENT_TIMEOUT", 30.0)
    )
    # Streamed replies in flight per token (0 = no cap); past it 429 with Retry-After.
    max_streams_per_token: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_MAX_STREAMS_PER_TOKEN", 4)
    )
    # Requests in flight per token (0 = no cap), below the pool's size so that one token (or
    # its expensive filters) cannot hold every connection; past it 429 with Retry-After.
    max_concurrent_per_token: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_MAX_CONCURRENT_PER_TOKEN", 10)
    )
    # A request whose body is larger than this many bytes (or of unknown length) is served by
    # a process of its own (service/bulk.py), so that its CPU never holds the GIL of the
    # process answering everyone else; 0 serves every request in the process that took it.
    bulk_body_bytes: int = field(
        default_factory=lambda: _int_env("SCIMLEDGER_BULK_BODY_BYTES", 64 * 1024)
    )
    # Seconds of worker-thread CPU one request may cost the front process before its token's
    # requests with a body go to the bulk process too, until a minute after the last of them
    # (service/limits_cost.py); 0 = by body size only.
    bulk_token_cpu: float = field(
        default_factory=lambda: _float_env("SCIMLEDGER_BULK_TOKEN_CPU", 0.01)
    )
    # The CPUs the bulk process and its PostgreSQL backends on this machine may run on
    # (service/limits_cpu.py): "auto" (the last quarter of those `serve` may use, at least
    # one, where there are two or more), "all", or a list such as "3" or "2-3,6".
    bulk_cpus: str = field(default_factory=lambda: os.environ.get("SCIMLEDGER_BULK_CPUS", "auto"))
    # Set by `serve` on the front processes: the bulk process's Unix socket. On the bulk
    # process itself: `bulk_peer` (it trusts the client address the front forwards).
    bulk_socket: str | None = None
    bulk_peer: bool = False
