-- The cost of POST /Users (issues 16, 17): indexes that every append maintained and no query
-- of the service reads.
-- subject_keys by tenant: only `scimledger keys rotate` (a rare operator command) lists a
-- tenant's keys; it scans the table instead. Every new user and group inserted into it.
DROP INDEX IF EXISTS subject_keys_tenant_idx;
-- stored_events by request_id: every event (two per POST) inserted a random text key into
-- it. A request's events are found through its provisioning-log entry (audit_entries by
-- change_id, indexed; its `positions` name the events) or by transaction_id (indexed).
DROP INDEX IF EXISTS stored_events_request_idx;
