-- Issue 17: the provisioning log's personal values (the target's name and external id, the
-- old and new values of modifiedProperties, an error's reason) are sealed under the data key
-- of the subject the entry is about (infra/audit_sealing.py): the clear columns then read
-- "[encrypted]" and the ciphertext is here. NULL: nothing sealed (no subject, or erased).
ALTER TABLE audit_entries ADD COLUMN sealed text;
