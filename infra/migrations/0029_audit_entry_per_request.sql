-- Issue 16: several requests may commit in one transaction (group commit of POST /Users), so
-- the provisioning log's entry is per request, not per transaction. Its key is the position
-- (notification_id) of the entry's first event: unique, fixed by the log, so a rebuild makes
-- the same key. transaction_id stays a plain column (the sealed values' associated data).
-- The log pages by (activity_at, entry_position): stable and unique.
ALTER TABLE audit_entries ADD COLUMN entry_position bigint;
-- An entry's positions are in log order: the first is its first event's.
UPDATE audit_entries SET entry_position = positions[1];
-- (An entry always has an event; should one have none, it keeps a key no event can have.)
UPDATE audit_entries SET entry_position = -transaction_id WHERE entry_position IS NULL;
ALTER TABLE audit_entries ALTER COLUMN entry_position SET NOT NULL;
ALTER TABLE audit_entries DROP CONSTRAINT audit_entries_pkey;
ALTER TABLE audit_entries ADD CONSTRAINT audit_entries_pkey PRIMARY KEY (entry_position);

DROP INDEX audit_entries_time_idx;
DROP INDEX audit_entries_target_idx;
DROP INDEX audit_entries_status_idx;
DROP INDEX audit_entries_action_idx;
DROP INDEX audit_entries_error_idx;
CREATE INDEX audit_entries_time_idx ON audit_entries (tenant_id, activity_at DESC, entry_position DESC);
CREATE INDEX audit_entries_target_idx ON audit_entries (tenant_id, target_id, activity_at DESC, entry_position DESC);
CREATE INDEX audit_entries_status_idx ON audit_entries (tenant_id, status, activity_at DESC, entry_position DESC);
CREATE INDEX audit_entries_action_idx ON audit_entries (tenant_id, action, activity_at DESC, entry_position DESC);
CREATE INDEX audit_entries_error_idx ON audit_entries (tenant_id, error_code, activity_at DESC, entry_position DESC)
    WHERE error_code IS NOT NULL;
