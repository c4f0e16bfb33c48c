-- Tenants and their bearer tokens. Tokens are stored only as SHA-256 digests.
CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz
);

CREATE TABLE tokens (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id),
    name         text NOT NULL,
    role         text NOT NULL CHECK (role IN ('provisioning', 'audit')),
    token_hash   bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);
CREATE INDEX tokens_tenant_idx ON tokens (tenant_id);

-- The event store. The first five columns are the eventsourcing library's layout, so its
-- tools can read the table; the rest is ours.
--
-- transaction_id is the writing transaction's id. Followers read in (transaction_id,
-- notification_id) order and only below the oldest transaction still in flight, so an event
-- whose transaction commits late is never skipped, and writers on different streams never
-- wait for each other (no table lock as in the library's own recorder).
CREATE TABLE stored_events (
    originator_id      uuid NOT NULL,
    originator_version bigint NOT NULL,
    topic              text NOT NULL,
    state              bytea NOT NULL,
    notification_id    bigserial NOT NULL,
    tenant_id          uuid NOT NULL,
    recorded_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    request_id         text,
    transaction_id     bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    PRIMARY KEY (originator_id, originator_version)
);
CREATE UNIQUE INDEX stored_events_notification_id_idx ON stored_events (notification_id);
CREATE INDEX stored_events_commit_order_idx ON stored_events (transaction_id, notification_id);
CREATE INDEX stored_events_tenant_idx ON stored_events (tenant_id, notification_id);
CREATE INDEX stored_events_request_idx ON stored_events (request_id) WHERE request_id IS NOT NULL;
