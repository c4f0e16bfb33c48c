-- The change id of an audit entry is the service's own request id; the client's X-Request-Id
-- (validated, at most 64 characters) is kept beside it, and an officer may look it up.
-- Entries of requests recorded before have none. The audit projection's version 3 fills it.
ALTER TABLE audit_entries ADD COLUMN client_request_id text;
CREATE INDEX audit_entries_client_request_idx ON audit_entries (tenant_id, client_request_id)
    WHERE client_request_id IS NOT NULL;
