-- The provisioning log: one entry per SCIM write request, kept by the asynchronous audit
-- projection from the event store (domain events and each request's RequestRecorded event).
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE audit_entries (
    -- The writing transaction: all the events of one request are appended in one.
    transaction_id      bigint PRIMARY KEY,
    id                  uuid UNIQUE,
    tenant_id           uuid NOT NULL,
    activity_at         timestamptz NOT NULL,
    change_id           text,
    action              text NOT NULL,
    status              text NOT NULL,
    error_code          text,
    error_reason        text,
    target_type         text,
    target_id           uuid,
    target_name         text,
    source_id           text,
    initiated_by        text,
    method              text,
    path                text,
    http_status         integer,
    duration_ms         double precision,
    positions           bigint[] NOT NULL DEFAULT '{}',
    modified_properties jsonb NOT NULL DEFAULT '[]'
);
-- Newest first per tenant, and the same with each portal filter in front.
CREATE INDEX audit_entries_time_idx ON audit_entries (tenant_id, activity_at DESC, transaction_id DESC);
CREATE INDEX audit_entries_target_idx ON audit_entries (tenant_id, target_id, activity_at DESC, transaction_id DESC);
CREATE INDEX audit_entries_change_idx ON audit_entries (tenant_id, change_id);
CREATE INDEX audit_entries_status_idx ON audit_entries (tenant_id, status, activity_at DESC, transaction_id DESC);
CREATE INDEX audit_entries_action_idx ON audit_entries (tenant_id, action, activity_at DESC, transaction_id DESC);
CREATE INDEX audit_entries_error_idx ON audit_entries (tenant_id, error_code, activity_at DESC, transaction_id DESC)
    WHERE error_code IS NOT NULL;
-- "identity contains": a trigram index, so the portal's free-text filter is no full scan.
CREATE INDEX audit_entries_name_trgm_idx ON audit_entries USING gin (target_name gin_trgm_ops);

-- The audit projection's own memory of each resource, to say what a change changed it from.
CREATE TABLE audit_resources (
    tenant_id uuid NOT NULL,
    id        uuid NOT NULL,
    type      text NOT NULL,
    version   bigint NOT NULL,
    state     jsonb NOT NULL,
    created   timestamptz NOT NULL,
    modified  timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
