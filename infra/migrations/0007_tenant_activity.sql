-- The activity view: per tenant, how many users and groups it has, how many events it has
-- caused and when it last changed. Kept by an asynchronous projection (a catch-up subscriber), not in the
-- append's transaction.
CREATE TABLE tenant_activity (
    tenant_id     uuid PRIMARY KEY,
    users         bigint NOT NULL DEFAULT 0,
    groups        bigint NOT NULL DEFAULT 0,
    events        bigint NOT NULL DEFAULT 0,
    last_event_at timestamptz
);
