-- Every projection's name, version and checkpoint (the last position it applied, in the
-- follower order of infra/eventstore.py: writer transaction id, then notification id).
CREATE TABLE projection_state (
    name                   text PRIMARY KEY,
    version                integer NOT NULL,
    mode                   text NOT NULL CHECK (mode IN ('inline', 'async')),
    checkpoint_transaction bigint NOT NULL DEFAULT 0,
    checkpoint_position    bigint NOT NULL DEFAULT 0,
    rebuilt_at             timestamptz,
    last_error             text,
    updated_at             timestamptz NOT NULL DEFAULT now()
);
