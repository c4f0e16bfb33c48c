-- SCIM event feeds (RFC 9967): streams, their pending SETs, signing keys (service/feeds/).

-- A poll stream's bearer token has the role `feed`: it may only poll its own stream.
ALTER TABLE tokens DROP CONSTRAINT IF EXISTS tokens_role_check;
ALTER TABLE tokens ADD CONSTRAINT tokens_role_check
    CHECK (role IN ('provisioning', 'audit', 'feed'));

-- One row per stream (a consumer). The checkpoint is the last event-store position the
-- producer turned into SETs, in the follower order of infra/eventstore.py.
CREATE TABLE feed_streams (
    id                     uuid PRIMARY KEY,
    tenant_id              uuid NOT NULL REFERENCES tenants (id),
    name                   text NOT NULL,
    delivery               text NOT NULL CHECK (delivery IN ('poll', 'push')),
    endpoint               text,
    events                 text[] NOT NULL,
    full_data              boolean NOT NULL DEFAULT false,
    scope_group            uuid,
    token_id               uuid REFERENCES tokens (id),
    paused_at              timestamptz,
    checkpoint_transaction bigint NOT NULL DEFAULT 0,
    checkpoint_position    bigint NOT NULL DEFAULT 0,
    produced               bigint NOT NULL DEFAULT 0,
    delivered              bigint NOT NULL DEFAULT 0,
    failing_since          timestamptz,
    last_error             text,
    created_at             timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name),
    CHECK ((delivery = 'push') = (endpoint IS NOT NULL))
);

-- SETs produced and not yet acknowledged (poll) or accepted (push), signed, in feed order.
-- A redelivery sends the same row: same jti, same token.
CREATE TABLE feed_sets (
    stream_id       uuid NOT NULL REFERENCES feed_streams (id) ON DELETE CASCADE,
    seq             bigint GENERATED ALWAYS AS IDENTITY,
    jti             text NOT NULL,
    kid             text NOT NULL,
    token           text NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, seq),
    UNIQUE (stream_id, jti)
);

-- Members of a group-scoped stream's group, as the producer has seen them (feed:add/remove).
CREATE TABLE feed_members (
    stream_id uuid NOT NULL REFERENCES feed_streams (id) ON DELETE CASCADE,
    member_id uuid NOT NULL,
    PRIMARY KEY (stream_id, member_id)
);

-- Per-tenant signing keys (ES256). Retired keys stay published while SETs they signed wait.
CREATE TABLE feed_keys (
    kid         text PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    private_pem text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    retired_at  timestamptz
);
CREATE INDEX feed_sets_kid_idx ON feed_sets (kid);
CREATE UNIQUE INDEX feed_keys_current_idx ON feed_keys (tenant_id) WHERE retired_at IS NULL;
