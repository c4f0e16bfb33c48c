-- Sign-in sessions of the provisioning log's web pages (/audit/). The cookie holds a random
-- session id; only its SHA-256 digest is kept here. Each request also checks the token the
-- session was opened with, so revoking the token (or disabling the tenant) ends the session.
CREATE TABLE audit_sessions (
    id_hash    bytea PRIMARY KEY,
    token_id   uuid NOT NULL REFERENCES tokens (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX audit_sessions_token_idx ON audit_sessions (token_id);
CREATE INDEX audit_sessions_expires_idx ON audit_sessions (expires_at);
